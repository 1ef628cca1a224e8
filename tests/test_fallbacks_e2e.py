"""Fallbacks: ``model`` names an ordered list; a retryable failure before the first token
moves on to the next model, on both doors (real processes, a local OpenAI-compatible server)."""

from __future__ import annotations

import httpx
import openai
import pytest
import redis

from tests.client import collect, create, status, text_of
from tests.fake_upstream import Record
from tests.stack import Stack

pytestmark = pytest.mark.slow  # starts real processes


@pytest.fixture(scope="module")
def stack(upstream_stack: Stack) -> Stack:
    return upstream_stack


def test_an_overloaded_upstream_falls_back_through_the_native_api(
        stack: Stack, upstream: tuple[str, Record]) -> None:
    """openai:status-503 fails retryably before a token: the next model answers."""
    gen = create(stack.url, model="openai:status-503,openai:echo-model",
                 prompt="one two three")
    events = collect(stack.url, gen["id"])
    assert events[-1].type == "done"
    assert text_of(events) == status(stack.url, gen["id"])["content"] == "one two three"
    asked = [r["model"] for r in upstream[1].requests]
    assert asked.index("status-503") < asked.index("echo-model")


def test_a_refusing_upstream_does_not_fall_back(stack: Stack) -> None:
    """A 401 would fail the same way on a retry: the generation fails, no fallback runs."""
    gen = create(stack.url, model="openai:status-401,fake:echo", prompt="never")
    events = collect(stack.url, gen["id"])
    assert [e.type for e in events if e.terminal] == ["error"]
    assert events[-1].data["retryable"] is False
    assert text_of(events) == ""


def test_the_openai_sdk_sees_the_fallbacks_answer(stack: Stack) -> None:
    """Through the Chat Completions facade, streamed: the second model's text."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="openai:status-500,fake:echo", stream=True,
        messages=[{"role": "user", "content": "falls back"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "falls back"


@pytest.mark.parametrize("model", ["fake:echo,bogus:x", "fake:echo,", "a,b,c,d,e"])
def test_a_bad_fallback_list_is_refused_and_creates_nothing(stack: Stack, model: str) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        keys_before = client.dbsize()
        response = httpx.post(f"{stack.url}/v1/generations",
                              json={"model": model, "prompt": "x"})
        assert response.status_code == 400
        assert "fallback" in response.json()["error"]["message"]
        assert client.dbsize() == keys_before
    finally:
        client.close()
