"""The standard sampling parameters: validated at both doors and carried to the upstream
as given (real processes; the local OpenAI-compatible server records what it received)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.client import collect, create, stored_generations
from tests.fake_upstream import Record
from tests.stack import Stack
from tokenrelay.worker.providers.anthropic import request_params
from tokenrelay.worker.providers.base import GenerationRequest

pytestmark = pytest.mark.slow  # starts real processes

SAMPLING: dict[str, Any] = {
    "stop": ["\n\n", "END"], "top_p": 0.9, "seed": 42, "frequency_penalty": 0.5,
    "presence_penalty": -0.5,
    "response_format": {"type": "json_schema",
                        "json_schema": {"name": "answer", "schema": {"type": "object"}}},
}


@pytest.fixture(scope="module")
def stack(upstream_stack: Stack) -> Stack:
    return upstream_stack


def _received(upstream: tuple[str, Record], marker: str) -> dict[str, Any]:
    (request,) = [r for r in upstream[1].requests
                  if marker in str(r["messages"][-1].get("content"))]
    return request


def test_the_native_door_carries_every_sampling_parameter(
        stack: Stack, upstream: tuple[str, Record]) -> None:
    gen = create(stack.url, model="openai:echo", prompt="native marker", **SAMPLING)
    assert collect(stack.url, gen["id"])[-1].type == "done"
    received = _received(upstream, "native marker")
    assert {k: received.get(k) for k in SAMPLING} == SAMPLING


def test_the_openai_sdk_carries_every_sampling_parameter(
        stack: Stack, upstream: tuple[str, Record]) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    for stream in (False, True):
        marker = f"sdk marker {stream}"
        answer = client.chat.completions.create(
            model="openai:echo", messages=[{"role": "user", "content": marker}],
            stream=stream, **SAMPLING)
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
        received = _received(upstream, marker)
        assert {k: received.get(k) for k in SAMPLING} == SAMPLING
    client.chat.completions.create(model="openai:echo", stop="once",
                                   messages=[{"role": "user", "content": "single stop"}])
    assert _received(upstream, "single stop")["stop"] == "once"


@pytest.mark.parametrize(("param", "value"), [
    ("top_p", 1.5), ("frequency_penalty", 3), ("presence_penalty", -2.5), ("seed", "x"),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("stop", ""),
    ("response_format", {"type": "xml"}), ("response_format", {"type": "json_schema"}),
])
def test_bad_values_are_refused_at_both_doors_and_create_nothing(
        stack: Stack, param: str, value: Any) -> None:
    before = stored_generations(stack.redis_url)
    native = httpx.post(f"{stack.url}/v1/generations",
                        json={"model": "openai:echo", "prompt": "x", param: value})
    chat = httpx.post(f"{stack.url}/v1/chat/completions", json={
        "model": "openai:echo", "messages": [{"role": "user", "content": "x"}], param: value})
    assert stored_generations(stack.redis_url) == before
    assert native.status_code == 422, native.text
    assert chat.status_code == 400 and param in chat.json()["error"]["message"], chat.text


def test_anthropic_gets_stop_as_stop_sequences() -> None:
    request = GenerationRequest(model="claude", messages=[{"role": "user", "content": "x"}],
                                extra={"stop": "END", "top_p": 0.5, "seed": 1})
    params = request_params(request, 100)
    assert params["stop_sequences"] == ["END"]
    assert "top_p" not in params and "seed" not in params
