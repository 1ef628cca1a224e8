"""Text no UTF-8 can carry (a lone surrogate): refused at every door with a 422 that
creates nothing, and replaced by U+FFFD when an upstream streams one, so the generation
completes and its status always answers (real processes, local OpenAI-compatible server)."""

from __future__ import annotations

import httpx
import pytest
import redis

from tests.client import collect, create, status, text_of
from tests.stack import Stack

pytestmark = pytest.mark.slow  # starts real processes

LONE = '"bad \\ud800 text"'  # a JSON string whose escape decodes to a lone surrogate


@pytest.fixture(scope="module")
def stack(upstream_stack: Stack) -> Stack:
    return upstream_stack


def _thread(stack: Stack) -> str:
    response = httpx.post(f"{stack.url}/v1/threads", json={"model": "fake:echo"})
    assert response.status_code == 201, response.text
    thread_id: str = response.json()["id"]
    return thread_id


@pytest.mark.parametrize("door", ["generations", "prompt", "metadata", "chat", "thread"])
def test_a_lone_surrogate_is_refused_at_every_door(stack: Stack, door: str) -> None:
    path, body = {
        "generations": ("/v1/generations",
                        f'{{"model": "fake:echo", "messages": [{{"role": "user", "content": {LONE}}}]}}'),
        "prompt": ("/v1/generations", f'{{"model": "fake:echo", "prompt": {LONE}}}'),
        "metadata": ("/v1/generations",
                     f'{{"model": "fake:echo", "prompt": "x", "metadata": {{"k": {LONE}}}}}'),
        "chat": ("/v1/chat/completions",
                 f'{{"model": "fake:echo", "messages": [{{"role": "user", "content": {LONE}}}]}}'),
        "thread": (f"/v1/threads/{_thread(stack)}/messages", f'{{"content": {LONE}}}'),
    }[door]
    client = redis.Redis.from_url(stack.redis_url)
    try:
        keys_before = client.dbsize()
        response = httpx.post(f"{stack.url}{path}", content=body,
                              headers={"content-type": "application/json"})
        # OpenAI answers every invalid request 400; the native API's schema errors are 422.
        assert response.status_code == (400 if door == "chat" else 422), response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_text" and "surrogate" in error["message"]
        assert client.dbsize() == keys_before
    finally:
        client.close()


def test_a_surrogate_pair_is_text_and_accepted(stack: Stack) -> None:
    response = httpx.post(f"{stack.url}/v1/generations",
                          content='{"model": "fake:echo", "prompt": "smile \\ud83d\\ude00"}',
                          headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text
    events = collect(stack.url, response.json()["id"])
    assert text_of(events) == "smile \U0001f600"


def test_an_upstream_lone_surrogate_becomes_a_replacement_character(stack: Stack) -> None:
    gen = create(stack.url, model="openai:surrogate", prompt="x")
    events = collect(stack.url, gen["id"])
    assert events[-1].type == "done"
    final = status(stack.url, gen["id"])
    assert final["status"] == "completed"
    assert text_of(events) == final["content"] == "bad \ufffd text"
