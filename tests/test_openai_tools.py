"""Tool calls and reasoning pass through with their meaning intact, on both endpoints.

A local OpenAI-compatible server (tests/fake_upstream.py, model ``tools``)
streams reasoning_content and two tool calls in fragments; the worker's openai:
provider carries them into the generation's stream; the native events and the
OpenAI-shaped chunks must hand back exactly what the server sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.client import collect, create, status
from tests.fake_upstream import (
    REASONING,
    TOOL_CALLS,
    Record,
    interleaved_tool_call_deltas,
    repeated_name_fragments,
    tool_call_fragments,
)
from tests.stack import Stack

pytestmark = pytest.mark.slow  # starts real processes


TOOLS = [
    {"type": "function", "function": {
        "name": call["name"], "strict": True,
        "parameters": {"type": "object", "properties": {}, "additionalProperties": True},
    }}
    for call in TOOL_CALLS
]
MESSAGES = [{"role": "user", "content": "weather and time in Paris?"}]
def _name_once(fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    named: set[int] = set()
    out = []
    for fragment in fragments:
        function = dict(fragment["function"])
        copy = {**fragment, "function": function}
        if fragment["index"] in named:
            del function["name"], copy["id"]
        named.add(fragment["index"])
        out.append(copy)
    return out


# What the server's tool calls are once assembled: the OpenAI message shape.
# The tool_calls of each upstream chunk, by model: one call after the other, or interleaved.
UPSTREAM_DELTAS = {
    "tools": [[fragment] for fragment in tool_call_fragments()],
    "tools-interleaved": interleaved_tool_call_deltas(),
    # llama.cpp repeats the name in every fragment; it is passed on once per call, as
    # OpenAI streams it, so accumulating clients do not read it twice.
    "tools-repeated": [[fragment] for fragment in _name_once(repeated_name_fragments())],
}
MODELS = pytest.mark.parametrize("model", sorted(UPSTREAM_DELTAS))
EXPECTED_CALLS = [
    {"id": c["id"], "type": "function",
     "function": {"name": c["name"], "arguments": c["arguments"]}}
    for c in TOOL_CALLS
]


@pytest.fixture(scope="module")
def stack(upstream_stack: Stack) -> Stack:
    """API and worker whose openai: provider talks to the local test server."""
    return upstream_stack


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="any", max_retries=0) as c:
        yield c


def assemble(fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls from their stream fragments, by index, as a client does."""
    calls: dict[int, dict[str, Any]] = {}
    for frag in fragments:
        call = calls.setdefault(frag["index"], {"id": "", "type": "", "function": {
            "name": "", "arguments": ""}})
        call["id"] = frag.get("id") or call["id"]
        call["type"] = frag.get("type") or call["type"]
        for part in ("name", "arguments"):
            call["function"][part] += (frag.get("function") or {}).get(part) or ""
    return [calls[i] for i in sorted(calls)]


@MODELS
def test_native_events_carry_the_exact_fragments_and_reasoning(
    stack: Stack, upstream: tuple[str, Record], model: str
) -> None:
    """Native delta events hold the server's tool-call deltas unchanged, and its reasoning."""
    created = create(stack.url, model=f"openai:{model}", messages=MESSAGES, tools=TOOLS)
    events = collect(stack.url, created["id"])
    deltas = [e.data for e in events if e.type == "delta"]
    assert [d["tool_calls"] for d in deltas if "tool_calls" in d] == UPSTREAM_DELTAS[model]
    fragments = [frag for d in deltas for frag in d.get("tool_calls", [])]
    assert assemble(fragments) == EXPECTED_CALLS
    assert "".join(d.get("reasoning", "") for d in deltas) == "".join(REASONING)
    assert events[-1].type == "done" and events[-1].data["finish_reason"] == "tool_calls"
    assert upstream[1].requests[-1]["tools"] == TOOLS  # the tools reached the provider
    final = status(stack.url, created["id"])
    assert final["finish_reason"] == "tool_calls" and final["content"] == ""


@MODELS
def test_sdk_accumulator_assembles_exactly_the_server_tool_calls(
    client: openai.OpenAI, model: str
) -> None:
    """The SDK's own accumulator rebuilds the server's tool calls and reasoning from our chunks."""
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    deltas = []
    for chunk in client.chat.completions.create(
        model=f"openai:{model}", messages=MESSAGES, tools=TOOLS, stream=True  # type: ignore[arg-type]
    ):
        state.handle_chunk(chunk)
        deltas += [[tc.model_dump(exclude_none=True) for tc in choice.delta.tool_calls]
                   for choice in chunk.choices if choice.delta.tool_calls]
    assert deltas == UPSTREAM_DELTAS[model]
    final = state.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [tc.model_dump(include={"id": True, "type": True,
                                   "function": {"name", "arguments"}})
            for tc in message.tool_calls or []] == EXPECTED_CALLS
    assert (message.model_extra or {}).get("reasoning_content") == "".join(REASONING)


def test_sdk_stream_helper_parses_strict_tool_arguments(client: openai.OpenAI) -> None:
    """client.chat.completions.stream() with strict tools: each call done, arguments parsed."""
    with client.chat.completions.stream(
        model="openai:tools", messages=MESSAGES, tools=TOOLS  # type: ignore[arg-type]
    ) as stream:
        done = [(e.name, e.parsed_arguments) for e in stream
                if e.type == "tool_calls.function.arguments.done"]
    assert done == [(c["name"], json.loads(c["arguments"])) for c in TOOL_CALLS]


async def test_async_sdk_stream_carries_reasoning_content_deltas(stack: Stack) -> None:
    """Each reasoning_content delta arrives in order on the async SDK's stream."""
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="any",
                                  max_retries=0) as aclient:
        stream = await aclient.chat.completions.create(
            model="openai:tools", messages=MESSAGES, tools=TOOLS, stream=True)  # type: ignore[arg-type]
        pieces = [
            (chunk.choices[0].delta.model_extra or {}).get("reasoning_content")
            async for chunk in stream if chunk.choices
        ]
    assert [p for p in pieces if p] == REASONING


@MODELS
def test_sdk_non_stream_returns_the_assembled_tool_calls(client: openai.OpenAI, model: str) -> None:
    """Non-stream: one ChatCompletion with the tool calls assembled, and the reasoning."""
    completion = client.chat.completions.create(
        model=f"openai:{model}", messages=MESSAGES, tools=TOOLS)  # type: ignore[arg-type]
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert [tc.model_dump() for tc in message.tool_calls or []] == EXPECTED_CALLS
    assert (message.model_extra or {}).get("reasoning_content") == "".join(REASONING)
    assert completion.usage is not None and completion.usage.prompt_tokens == 7


def test_tool_results_go_back_to_the_provider(
    stack: Stack, upstream: tuple[str, Record]
) -> None:
    """The assistant tool_calls message and the tool answers reach the upstream unchanged."""
    conversation = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": EXPECTED_CALLS},
        {"role": "tool", "tool_call_id": "call_a1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_b2", "content": "14:05"},
        {"role": "user", "content": "thanks"},
    ]
    response = httpx.post(f"{stack.url}/v1/chat/completions", timeout=10, json={
        "model": "openai:echo", "messages": conversation, "tools": TOOLS})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "thanks"
    sent = upstream[1].requests[-1]["messages"]
    assert sent[1]["tool_calls"] == EXPECTED_CALLS
    assert [(m.get("tool_call_id"), m["content"]) for m in sent[2:4]] == [
        ("call_a1", "18 C"), ("call_b2", "14:05")]
