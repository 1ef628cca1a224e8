"""The anthropic: provider against a local server that speaks Anthropic's streaming SSE.

Only the network's far side is fake (tests/fake_anthropic.py); the official SDK,
its SSE parsing and its errors are the real ones.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.fake_anthropic import (
    API_KEY,
    INPUT_TOKENS,
    THINKING,
    TOOL_USES,
    Record,
    argument_fragments,
    fake_anthropic,
)
from tokenrelay.shared.errors import ProviderError, UpstreamError
from tokenrelay.worker.providers import Chunk, Delta, Finish, GenerationRequest
from tokenrelay.worker.providers.anthropic import AnthropicProvider, convert_messages

HELLO = [{"role": "user", "content": "hello there big world"}]
TOOLS = [
    {"type": "function", "function": {
        "name": tool["name"], "description": f"{tool['name']} of a place",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": True},
    }}
    for tool in TOOL_USES
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Record]]:
    with fake_anthropic() as found:
        yield found


@pytest.fixture
async def provider(upstream: tuple[str, Record]) -> AsyncIterator[AnthropicProvider]:
    p = AnthropicProvider(upstream[0], API_KEY)
    yield p
    await p.aclose()


async def run(provider: AnthropicProvider, model: str,
              messages: list[dict[str, Any]] | None = None, **kw: Any) -> list[Chunk]:
    request = GenerationRequest(model=model, messages=messages or HELLO, **kw)
    return [chunk async for chunk in provider.stream(request)]


def text(chunks: list[Chunk]) -> str:
    return "".join(c.content or "" for c in chunks if isinstance(c, Delta))


async def test_text_streams_word_by_word_then_one_finish(provider: AnthropicProvider) -> None:
    """Each text_delta is one content delta; one Finish comes last with stop and the usage."""
    chunks = await run(provider, "echo")
    assert [c.content for c in chunks[:-1]] == ["hello", " there", " big", " world"]
    assert chunks[-1] == Finish("stop", {"prompt_tokens": INPUT_TOKENS, "completion_tokens": 4,
                                         "total_tokens": INPUT_TOKENS + 4})


async def test_thinking_deltas_become_reasoning(provider: AnthropicProvider) -> None:
    """thinking_delta text arrives as reasoning, in order, before the answer's content."""
    chunks = await run(provider, "thinking")
    deltas = [c for c in chunks if isinstance(c, Delta)]
    assert [d.reasoning for d in deltas if d.reasoning] == THINKING
    assert deltas[len(THINKING)].content == "hello"  # signature_delta yields nothing
    assert text(chunks) == "hello there big world"


async def test_tool_use_blocks_become_openai_tool_call_fragments(
    provider: AnthropicProvider, upstream: tuple[str, Record]
) -> None:
    """Each tool_use block opens a call (id, name, index), then its partial_json fragments."""
    chunks = await run(provider, "tools", extra={"tools": TOOLS, "tool_choice": "auto"})
    fragments = [tc for c in chunks if isinstance(c, Delta) for tc in c.tool_calls or []]
    expected: list[dict[str, Any]] = []
    for index, tool in enumerate(TOOL_USES):
        expected.append({"index": index, "id": tool["id"], "type": "function",
                         "function": {"name": tool["name"], "arguments": ""}})
        expected += [{"index": index, "function": {"arguments": piece}}
                     for piece in argument_fragments(tool["input"]) if piece]
    assert fragments == expected
    for index, tool in enumerate(TOOL_USES):
        args = "".join(f["function"]["arguments"] for f in fragments if f["index"] == index)
        assert json.loads(args) == tool["input"]
    assert isinstance(chunks[-1], Finish) and chunks[-1].finish_reason == "tool_calls"
    sent = upstream[1].requests[-1]
    assert sent["tools"] == [{"name": t["name"], "description": f"{t['name']} of a place",
                              "input_schema": TOOLS[0]["function"]["parameters"]}
                             for t in TOOL_USES]
    assert sent["tool_choice"] == {"type": "auto"}


async def test_tool_without_arguments_still_hands_over_json(provider: AnthropicProvider) -> None:
    """A tool_use whose only fragment is empty ends with arguments '{}', which a client can parse."""
    chunks = await run(provider, "tool-noargs")
    fragments = [tc for c in chunks if isinstance(c, Delta) for tc in c.tool_calls or []]
    assert "".join(f["function"]["arguments"] for f in fragments) == "{}"
    assert fragments[0]["function"]["name"] == "now"


@pytest.mark.parametrize(("model", "reason"), [("echo", "stop"), ("stop-sequence", "stop"),
                                               ("max-tokens", "length"), ("tools", "tool_calls")])
async def test_stop_reasons_map_to_openai_finish_reasons(
    provider: AnthropicProvider, model: str, reason: str
) -> None:
    """end_turn and stop_sequence are stop, max_tokens is length, tool_use is tool_calls."""
    chunks = await run(provider, model)
    assert isinstance(chunks[-1], Finish) and chunks[-1].finish_reason == reason
    assert sum(isinstance(c, Finish) for c in chunks) == 1


async def test_request_is_translated_to_the_messages_api(
    provider: AnthropicProvider, upstream: tuple[str, Record]
) -> None:
    """System goes to `system`, max_tokens defaults to 1024, temperature is not sent, key sent."""
    await run(provider, "echo", [{"role": "system", "content": "Be brief."}, *HELLO],
              temperature=0.3)
    sent = upstream[1].requests[-1]
    assert sent["system"] == "Be brief."
    assert sent["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "hello there big world"}]}]
    assert sent["max_tokens"] == 1024 and "temperature" not in sent and sent["stream"] is True
    headers = upstream[1].headers[-1]
    assert API_KEY in (headers.get("x-api-key"), headers.get("authorization", "")[7:])
    assert headers.get("anthropic-version")
    await run(provider, "echo", max_tokens=7)
    assert upstream[1].requests[-1]["max_tokens"] == 7


def test_tool_calls_and_results_become_tool_use_and_tool_result_blocks() -> None:
    """Assistant tool_calls are tool_use blocks; consecutive tool messages share one user turn."""
    calls = [{"id": t["id"], "type": "function",
              "function": {"name": t["name"], "arguments": json.dumps(t["input"])}}
             for t in TOOL_USES]
    system, turns = convert_messages([
        {"role": "system", "content": "S1"},
        {"role": "developer", "content": [{"type": "text", "text": "S2"}]},
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "12C"},
        {"role": "tool", "tool_call_id": "toolu_02B", "content": [{"type": "text", "text": "9am"}]},
        {"role": "user", "content": "thanks"},
    ])
    assert system == "S1\n\nS2"
    assert turns == [
        {"role": "user", "content": [{"type": "text", "text": "weather and time?"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": t["id"], "name": t["name"], "input": t["input"]}
            for t in TOOL_USES]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "12C"},
            {"type": "tool_result", "tool_use_id": "toolu_02B", "content": "9am"},
            {"type": "text", "text": "thanks"}]},
    ]


def test_tool_call_arguments_that_are_not_an_object_are_refused() -> None:
    """Anthropic's tool_use input is an object: other arguments fail before any call."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
    with pytest.raises(ProviderError):
        convert_messages([{"role": "assistant", "tool_calls": [call]}])


async def test_401_is_not_retryable_and_calls_once(upstream: tuple[str, Record]) -> None:
    """A wrong key is a 401: not retryable, status kept, and the SDK did not retry it."""
    provider = AnthropicProvider(upstream[0], "wrong-key")
    calls = len(upstream[1].requests)
    try:
        with pytest.raises(UpstreamError) as info:
            await run(provider, "echo")
    finally:
        await provider.aclose()
    assert info.value.retryable is False and info.value.upstream_status == 401
    assert len(upstream[1].requests) == calls + 1


@pytest.mark.parametrize(("status", "retryable"), [(400, False), (403, False), (404, False),
                                                   (422, False), (429, True), (500, True),
                                                   (529, True)])
async def test_error_statuses_say_whether_a_retry_may_help(
    provider: AnthropicProvider, upstream: tuple[str, Record], status: int, retryable: bool
) -> None:
    """Refusals of the request are final; rate limits, server errors and 529 overloaded are not."""
    calls = len(upstream[1].requests)
    with pytest.raises(UpstreamError) as info:
        await run(provider, f"status-{status}")
    assert (info.value.retryable, info.value.upstream_status) == (retryable, status)
    assert len(upstream[1].requests) == calls + 1


async def test_overloaded_error_event_mid_stream_is_retryable(provider: AnthropicProvider) -> None:
    """An `error` event inside a 200 stream fails the generation as a retryable 529."""
    seen: list[Chunk] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in provider.stream(GenerationRequest(model="overloaded", messages=HELLO)):
            seen.append(chunk)
    assert text(seen) == "hello there"
    assert not any(isinstance(c, Finish) for c in seen)
    assert info.value.retryable is True and info.value.upstream_status == 529


async def test_stream_cut_before_message_stop_is_an_error_not_a_finish(
    provider: AnthropicProvider,
) -> None:
    """A body that ends without message_delta/message_stop raises: a cut answer is never done."""
    seen: list[Chunk] = []
    with pytest.raises(UpstreamError, match="message_stop") as info:
        async for chunk in provider.stream(GenerationRequest(model="cut", messages=HELLO)):
            seen.append(chunk)
    assert text(seen) == "hello there"
    assert not any(isinstance(c, Finish) for c in seen)
    assert info.value.retryable is True


async def test_unreachable_upstream_is_retryable() -> None:
    """A refused connection is a retryable error with no upstream status."""
    from tokenrelay.cli.redis_server import free_port

    provider = AnthropicProvider(f"http://127.0.0.1:{free_port()}", API_KEY)
    try:
        with pytest.raises(UpstreamError) as info:
            await run(provider, "echo")
    finally:
        await provider.aclose()
    assert info.value.retryable is True and info.value.upstream_status is None


async def test_cancelling_the_consumer_closes_the_connection(
    provider: AnthropicProvider, upstream: tuple[str, Record]
) -> None:
    """Cancelling the task that reads the stream closes the HTTP connection mid-answer."""
    record = upstream[1]
    disconnected = record.disconnected
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(GenerationRequest(model="slow", messages=HELLO)):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = asyncio.get_running_loop().time() + 5
    while record.disconnected == disconnected:
        assert asyncio.get_running_loop().time() < deadline, "the server saw no disconnect"
        await asyncio.sleep(0.02)
    assert record.disconnected == disconnected + 1
