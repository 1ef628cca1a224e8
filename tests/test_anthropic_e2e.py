"""anthropic: models end to end: real API and worker processes, a local Anthropic server.

The native door (/v1/generations events) and the official openai SDK against the
/v1/chat/completions facade must hand back the same answer: the text, and each
tool call's name and JSON arguments, as the Anthropic server streamed them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.client import collect, create, status, text_of
from tests.fake_anthropic import API_KEY, INPUT_TOKENS, THINKING, TOOL_USES, Record, fake_anthropic
from tests.stack import Stack, wait_for

PROMPT = "hello from the anthropic upstream"
MESSAGES = [{"role": "user", "content": "weather and time in Paris?"}]
TOOLS = [
    {"type": "function", "function": {
        "name": tool["name"],
        "parameters": {"type": "object", "properties": {}, "additionalProperties": True},
    }}
    for tool in TOOL_USES
]
# What the server's tool_use blocks are, as a client reads them: (id, name, parsed arguments).
EXPECTED_CALLS = [(t["id"], t["name"], t["input"]) for t in TOOL_USES]


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Record]]:
    with fake_anthropic() as found:
        yield found


@pytest.fixture(scope="module")
def stack(upstream: tuple[str, Record]) -> Iterator[Stack]:
    """API and worker whose anthropic: provider talks to the local Anthropic server."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_ANTHROPIC_BASE_URL": upstream[0],
                                      "TOKENRELAY_ANTHROPIC_API_KEY": API_KEY})
    yield s
    s.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="any", max_retries=0) as c:
        yield c


def native_calls(deltas: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """Tool calls assembled from native delta events by index: (id, name, parsed arguments)."""
    calls: dict[int, dict[str, str]] = {}
    for frag in (f for d in deltas for f in d.get("tool_calls", [])):
        call = calls.setdefault(frag["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] += frag.get("id", "")
        call["name"] += frag.get("function", {}).get("name", "")
        call["arguments"] += frag.get("function", {}).get("arguments", "")
    return [(c["id"], c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_native_door_streams_text_then_done_with_usage(
    stack: Stack, upstream: tuple[str, Record]
) -> None:
    """Deltas carry the server's text; done says stop and carries the usage; status agrees."""
    gen = create(stack.url, model="anthropic:echo", prompt=PROMPT)
    events = collect(stack.url, gen["id"])
    assert [e.type for e in events][-1] == "done"
    assert text_of(events) == PROMPT
    usage = {"prompt_tokens": INPUT_TOKENS, "completion_tokens": len(PROMPT.split()),
             "total_tokens": INPUT_TOKENS + len(PROMPT.split())}
    assert events[-1].data == {"finish_reason": "stop", "usage": usage}
    final = status(stack.url, gen["id"])
    assert (final["status"], final["content"], final["usage"]) == ("completed", PROMPT, usage)
    assert upstream[1].requests[-1]["model"] == "echo"


def test_native_door_carries_reasoning_and_tool_calls(stack: Stack) -> None:
    """Thinking arrives as reasoning deltas, tool_use blocks as tool-call fragments; done says tool_calls."""
    gen = create(stack.url, model="anthropic:tools", messages=MESSAGES, tools=TOOLS)
    events = collect(stack.url, gen["id"])
    deltas = [e.data for e in events if e.type == "delta"]
    assert "".join(d.get("reasoning", "") for d in deltas) == "".join(THINKING)
    assert native_calls(deltas) == EXPECTED_CALLS
    assert events[-1].type == "done" and events[-1].data["finish_reason"] == "tool_calls"


def test_openai_sdk_non_stream_sees_the_native_text(stack: Stack, client: openai.OpenAI) -> None:
    """A non-stream chat completion holds the same text and usage as the native door."""
    native = text_of(collect(stack.url, create(stack.url, model="anthropic:echo",
                                               prompt=PROMPT)["id"]))
    completion = client.chat.completions.create(
        model="anthropic:echo", messages=[{"role": "user", "content": PROMPT}])
    choice = completion.choices[0]
    assert choice.message.content == native == PROMPT
    assert choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens == INPUT_TOKENS


def test_openai_sdk_stream_sees_the_native_text(stack: Stack, client: openai.OpenAI) -> None:
    """Streamed chunks concatenate to the native door's text; the usage chunk comes last."""
    native = text_of(collect(stack.url, create(stack.url, model="anthropic:echo",
                                               prompt=PROMPT)["id"]))
    chunks = list(client.chat.completions.create(
        model="anthropic:echo", messages=[{"role": "user", "content": PROMPT}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == native
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(
        PROMPT.split())


def test_openai_sdk_stream_assembles_the_native_tool_calls(
    stack: Stack, client: openai.OpenAI
) -> None:
    """The SDK's own accumulator rebuilds the same calls (name, JSON arguments) as the native door."""
    native = native_calls([e.data for e in collect(stack.url, create(
        stack.url, model="anthropic:tools", messages=MESSAGES, tools=TOOLS)["id"])
        if e.type == "delta"])
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(
        model="anthropic:tools", messages=MESSAGES, tools=TOOLS, stream=True  # type: ignore[arg-type]
    ):
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    calls = [(tc.id, tc.function.name, json.loads(tc.function.arguments))
             for tc in final.message.tool_calls or [] if tc.type == "function"]
    assert calls == native == EXPECTED_CALLS
    assert (final.message.model_extra or {}).get("reasoning_content") == "".join(THINKING)


def test_openai_sdk_non_stream_returns_the_tool_calls(client: openai.OpenAI) -> None:
    """A non-stream completion's message.tool_calls are the server's calls, arguments valid JSON."""
    completion = client.chat.completions.create(
        model="anthropic:tools", messages=MESSAGES, tools=TOOLS)  # type: ignore[arg-type]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = [(tc.id, tc.function.name, json.loads(tc.function.arguments))
             for tc in choice.message.tool_calls or [] if tc.type == "function"]
    assert calls == EXPECTED_CALLS


def test_tool_results_reach_anthropic_as_tool_result_blocks(
    client: openai.OpenAI, upstream: tuple[str, Record]
) -> None:
    """An OpenAI tool-call round trip arrives as tool_use and tool_result blocks, system apart."""
    calls = [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
             for i, n, a in EXPECTED_CALLS]
    completion = client.chat.completions.create(model="anthropic:echo", tools=TOOLS, messages=[  # type: ignore[arg-type]
        {"role": "system", "content": "Be brief."},
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "12C"},
        {"role": "tool", "tool_call_id": "toolu_02B", "content": "9am"},
    ])
    assert completion.choices[0].finish_reason == "stop"
    sent = upstream[1].requests[-1]
    assert sent["system"] == "Be brief."
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert [(b["id"], b["name"], b["input"]) for b in sent["messages"][1]["content"]] == (
        EXPECTED_CALLS)
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "12C"},
        {"type": "tool_result", "tool_use_id": "toolu_02B", "content": "9am"}]


@pytest.mark.parametrize(("model", "retryable"), [("status-401", False), ("status-529", True),
                                                  ("overloaded", True), ("cut", True)])
def test_upstream_failures_end_in_an_error_event(
    stack: Stack, model: str, retryable: bool
) -> None:
    """A refused call, an overloaded one, an error event or a cut stream ends in `error`, never `done`."""
    gen = create(stack.url, model=f"anthropic:{model}", prompt=PROMPT)
    events = collect(stack.url, gen["id"])
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "upstream_error"
    assert events[-1].data["retryable"] is retryable
    assert status(stack.url, gen["id"])["status"] == "failed"


def test_cancel_closes_the_anthropic_connection(
    stack: Stack, upstream: tuple[str, Record]
) -> None:
    """Cancel mid-stream: `cancelled` arrives and the Anthropic server sees its connection closed."""
    record = upstream[1]
    before = record.disconnected
    gen = create(stack.url, model="anthropic:slow", prompt="go")
    first = collect(stack.url, gen["id"], limit=5)  # queued, running, 3 deltas: mid-stream
    assert first[-1].type == "delta"
    assert httpx.post(f"{stack.url}/v1/generations/{gen['id']}/cancel").status_code == 202
    assert collect(stack.url, gen["id"], after=first[-1].id)[-1].type == "cancelled"
    wait_for(lambda: record.disconnected > before, 5, what="upstream connection closed")
