"""Unit tests of the OpenAI facade's pieces: request checks, event → chunk translation, assembly."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tokenrelay.api import openai_request
from tokenrelay.api.openai_errors import OpenAIError
from tokenrelay.api.openai_response import DONE_FRAME, ChunkStream, Completion, with_heartbeat
from tokenrelay.shared.events import Event

GEN = "gen_" + "0" * 32


def ev(n: int, type_: str, **data: Any) -> Event:
    return Event(f"1-{n}", type_, data)


def frames_of(raw: bytes) -> list[tuple[str | None, str]]:
    """(id, data) of each SSE frame in ``raw``."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("id"), fields["data"]))
    return out


def test_first_frame_is_the_role_chunk_with_the_first_event_id() -> None:
    """The stream opens with the assistant role chunk, carrying the native id of the first event."""
    view = ChunkStream(GEN, "fake:echo", 7, include_usage=False)
    (frame_id, data), = frames_of(view.frames(ev(0, "status", status="queued")))
    chunk = json.loads(data)
    assert frame_id == "1-0"
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk["id"] == GEN and chunk["object"] == "chat.completion.chunk"


def test_deltas_map_to_openai_fields_and_keep_their_ids() -> None:
    """content, reasoning and tool_calls become content, reasoning_content and tool_calls."""
    view = ChunkStream(GEN, "m", 7, include_usage=False)
    view.frames(ev(0, "status", status="queued"))
    call = [{"index": 1, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]
    out = frames_of(view.frames(ev(1, "delta", content="Hi", reasoning="hmm", tool_calls=call)))
    assert out[0][0] == "1-1"
    assert json.loads(out[0][1])["choices"][0]["delta"] == {
        "content": "Hi", "reasoning_content": "hmm", "tool_calls": call}


def test_done_sends_finish_then_usage_then_done_marker() -> None:
    """With include_usage, done gives the finish chunk, a usage chunk with no choices, [DONE]."""
    view = ChunkStream(GEN, "m", 7, include_usage=True)
    view.frames(ev(0, "status", status="queued"))
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    raw = view.frames(ev(5, "done", finish_reason="length", usage=usage))
    assert raw.endswith(DONE_FRAME) and view.finished
    finish, usage_chunk = (json.loads(d) for _, d in frames_of(raw[: -len(DONE_FRAME)]))
    assert finish["choices"][0]["finish_reason"] == "length" and finish["usage"] is None
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == usage


@pytest.mark.parametrize(("terminal", "code"), [
    (ev(3, "cancelled"), "cancelled"),
    (ev(3, "error", code="timeout", message="too slow", retryable=False), "timeout"),
])
def test_cancel_and_error_end_the_stream_with_an_error_object(terminal: Event, code: str) -> None:
    """cancelled and error become OpenAI's in-stream error object, and no [DONE]."""
    view = ChunkStream(GEN, "m", 7, include_usage=False)
    view.frames(ev(0, "status", status="queued"))
    raw = view.frames(terminal)
    (frame_id, data), = frames_of(raw)
    assert view.finished and DONE_FRAME not in raw and frame_id == "1-3"
    assert json.loads(data)["error"]["code"] == code


def test_restart_before_output_is_invisible_and_after_output_is_an_error() -> None:
    """A restart before any delta changes nothing; after one it ends the stream, never garbled."""
    quiet = ChunkStream(GEN, "m", 7, include_usage=False)
    quiet.frames(ev(0, "status", status="queued"))
    assert quiet.frames(ev(1, "status", status="restarted")) == b""
    assert not quiet.finished

    spoken = ChunkStream(GEN, "m", 7, include_usage=False)
    spoken.frames(ev(0, "status", status="queued"))
    spoken.frames(ev(1, "delta", content="Hel"))
    (_, data), = frames_of(spoken.frames(ev(2, "status", status="restarted")))
    assert spoken.finished and json.loads(data)["error"]["code"] == "generation_restarted"


def test_completion_assembles_tool_calls_by_index_and_restarts_cleanly() -> None:
    """Fragments merge by index (id kept, arguments appended); a restart drops the first try."""
    done = Completion(GEN, "m", 7)
    done.feed(ev(1, "delta", content="junk"))
    done.feed(ev(2, "status", status="restarted"))
    done.feed(ev(3, "delta", reasoning="think"))
    done.feed(ev(4, "delta", tool_calls=[{"index": 1, "id": "b", "type": "function",
                                          "function": {"name": "g", "arguments": ""}}]))
    done.feed(ev(5, "delta", tool_calls=[{"index": 0, "id": "a", "type": "function",
                                          "function": {"name": "f", "arguments": "{\"x\""}}]))
    done.feed(ev(6, "delta", tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}},
                                         {"index": 1, "function": {"arguments": "{}"}}]))
    assert done.feed(ev(7, "done", finish_reason="tool_calls", usage=None))
    message = done.body()["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"] == "think"
    assert message["tool_calls"] == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]


@pytest.mark.parametrize(("terminal", "status", "retry"), [
    (ev(1, "error", code="upstream_error", message="boom", retryable=True), 502, "true"),
    (ev(1, "error", code="timeout", message="slow", retryable=False), 504, "false"),
    (ev(1, "cancelled"), 409, "false"),
])
def test_completion_of_an_unfinished_generation_raises_a_mapped_error(
    terminal: Event, status: int, retry: str
) -> None:
    """Non-stream: error and cancelled raise an OpenAIError with a fitting status and retry hint."""
    completion = Completion(GEN, "m", 7)
    completion.feed(terminal)
    with pytest.raises(OpenAIError) as info:
        completion.body()
    assert info.value.status == status
    assert info.value.headers["x-should-retry"] == retry


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "fake:echo"}, "messages", "missing_required_parameter"),
    ({"model": "fake:echo", "messages": [], "stream": True}, "messages", "invalid_value"),
    ({"model": "fake:echo", "messages": [{"role": "user", "content": "x"}], "n": 2},
     "n", "unsupported_value"),
    ({"model": "fake:echo", "messages": [{"role": "user", "content": "x"}],
      "logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
    ({"model": "fake:echo", "messages": [{"role": "robot", "content": "x"}]},
     "messages.0.role", "invalid_value"),
    ({"model": "fake:echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     "max_tokens", "invalid_value"),
])
def test_bad_requests_name_the_offending_parameter(
    body: dict[str, Any], param: str, code: str
) -> None:
    """Each bad request is a 400 naming its parameter, as OpenAI's API does."""
    with pytest.raises(OpenAIError) as info:
        openai_request.parse(json.dumps(body).encode())
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)


@pytest.mark.parametrize("raw", [b"{", b"[1]", b"\xff", b"[" * 100_000 + b"]" * 100_000])
def test_unparseable_bodies_are_400(raw: bytes) -> None:
    """Broken, non-object or absurdly nested JSON is a 400, never an exception."""
    with pytest.raises(OpenAIError) as info:
        openai_request.parse(raw)
    assert info.value.status == 400


def test_null_and_label_only_parameters_are_accepted() -> None:
    """Parameters sent as null, and label-only ones like `user`, do not fail the request."""
    request = openai_request.parse(json.dumps({
        "model": "fake:echo", "messages": [{"role": "user", "content": "x"}],
        "top_p": None, "user": "u1", "store": False, "n": 1, "stream_options": {
            "include_usage": True, "include_obfuscation": False},
    }).encode())
    assert request.include_usage and not request.stream


async def test_heartbeat_ticks_while_quiet_and_loses_nothing() -> None:
    """While the source is quiet, None ticks come; the item that follows still arrives, once."""
    release = asyncio.Event()
    closed = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        try:
            await release.wait()
            yield "item"
            await asyncio.Event().wait()  # quiet forever after
        finally:
            closed.set()

    seen: list[str | None] = []
    async with contextlib.aclosing(with_heartbeat(source(), 0.01)) as items:
        async for item in items:
            seen.append(item)
            if item is None:
                release.set()
            else:
                break
    assert seen[-1] == "item" and seen.count("item") == 1 and seen[0] is None
    assert closed.is_set()  # the consumer's exit closed the source


@pytest.mark.parametrize(("failure", "code"), [(None, "stream_lost"),
                                               (ConnectionError("reset"), "redis_unavailable")])
async def test_a_stream_cut_short_ends_with_an_error_not_silence(
    monkeypatch: pytest.MonkeyPatch, failure: Exception | None, code: str
) -> None:
    """Events that stop without a terminal (expired, Redis lost) end the chat stream with an error."""
    from types import SimpleNamespace

    from tokenrelay.api.routes import openai_compat

    async def events(*_: object) -> AsyncIterator[Event]:
        yield ev(0, "status", status="queued")
        yield ev(1, "delta", content="Hel")
        if failure is not None:
            raise failure

    monkeypatch.setattr(openai_compat, "events_after", events)
    state = SimpleNamespace(hub=None, settings=SimpleNamespace(heartbeat_s=5.0))
    view = ChunkStream(GEN, "m", 7, include_usage=False)
    out = b"".join([f async for f in openai_compat._chunk_frames(state, GEN, view)])  # type: ignore[arg-type]
    *_, last = frames_of(out)
    assert json.loads(last[1])["error"]["code"] == code and DONE_FRAME not in out
