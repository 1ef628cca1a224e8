"""The AI SDK's UI message stream (api.ui_stream): each event's chunks follow from the parts
left open by the events before it; a group's last frame carries the event's id."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenrelay.api.ui_stream import RESTARTED_TEXT, UIState, start_frame, step
from tokenrelay.shared import events as ev


def fold(*events: tuple[str, dict[str, Any]]) -> list[tuple[str | None, Any]]:
    """(id, chunk) of every frame of ``events`` folded from a fresh state (id None: none)."""
    state, out = UIState(), b""
    for n, (etype, data) in enumerate(events):
        out += step(state, ev.Event(f"1-{n}", etype, data))
    frames: list[tuple[str | None, Any]] = []
    for block in out.decode().split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        data = fields["data"]
        frames.append((fields.get("id"), data if data == "[DONE]" else json.loads(data)))
    return frames


def types(frames: list[tuple[str | None, Any]]) -> list[str]:
    return [chunk if chunk == "[DONE]" else chunk["type"] for _, chunk in frames]


QUEUED = (ev.STATUS, {"status": ev.QUEUED})
RUNNING = (ev.STATUS, {"status": ev.RUNNING})
DONE = (ev.DONE, {"finish_reason": "stop"})


def test_text_opens_once_closes_at_the_end_and_ids_end_each_group() -> None:
    """Status events write nothing; text-start comes with the first delta; the group's last
    frame has the event's id; done closes the text, finishes and ends with [DONE]."""
    frames = fold(QUEUED, RUNNING, (ev.DELTA, {"content": "Hel"}),
                  (ev.DELTA, {"content": "lo"}), DONE)
    assert frames == [
        (None, {"type": "text-start", "id": "text-1"}),
        ("1-2", {"type": "text-delta", "id": "text-1", "delta": "Hel"}),
        ("1-3", {"type": "text-delta", "id": "text-1", "delta": "lo"}),
        (None, {"type": "text-end", "id": "text-1"}),
        ("1-4", {"type": "finish", "finishReason": "stop"}),
        (None, "[DONE]"),
    ]


def test_reasoning_then_text_then_tool_calls_switch_parts() -> None:
    """Each kind of delta ends the open part of another kind; tool inputs end with their
    parsed arguments, and the finish reason takes the UI's spelling."""
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": '{"a":'}}
    frames = fold(QUEUED, (ev.DELTA, {"reasoning": "hm"}), (ev.DELTA, {"content": "ok"}),
                  (ev.DELTA, {"tool_calls": [call]}),
                  (ev.DELTA, {"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
                  (ev.DONE, {"finish_reason": "tool_calls"}))
    assert types(frames) == [
        "reasoning-start", "reasoning-delta", "reasoning-end", "text-start", "text-delta",
        "text-end", "tool-input-start", "tool-input-delta", "tool-input-delta",
        "tool-input-available", "finish", "[DONE]",
    ]
    assert frames[9][1]["input"] == {"a": 1}
    assert frames[10][1]["finishReason"] == "tool-calls"


def test_arguments_that_are_not_json_end_as_a_tool_input_error() -> None:
    """A call whose arguments do not parse is a tool-input-error with the raw text."""
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{oops"}}
    frames = fold(QUEUED, (ev.DELTA, {"tool_calls": [call]}), DONE)
    assert frames[2][1] == {"type": "tool-input-error", "toolCallId": "c", "toolName": "f",
                            "input": "{oops", "dynamic": True,
                            "errorText": "the arguments are not valid JSON"}


@pytest.mark.parametrize(("terminal", "last"), [
    ((ev.CANCELLED, {}), {"type": "abort"}),
    ((ev.ERROR, {"code": "upstream_error", "message": "boom", "retryable": False}),
     {"type": "error", "errorText": "boom"}),
])
def test_a_failed_or_cancelled_answer_closes_its_parts_and_ends(
    terminal: tuple[str, dict[str, Any]], last: dict[str, Any]
) -> None:
    """Cancelled ends with abort, failed with the protocol's error part; both with [DONE]."""
    frames = fold(QUEUED, (ev.DELTA, {"content": "a"}), terminal)
    assert frames[-3:] == [(None, {"type": "text-end", "id": "text-1"}), ("1-2", last),
                           (None, "[DONE]")]


def test_a_restart_is_silent_before_output_and_an_error_part_after() -> None:
    """A restarted attempt before any output writes nothing; after output an error part
    says so, and the new attempt's text is a new part."""
    assert fold(QUEUED, (ev.STATUS, {"status": ev.RESTARTED})) == []
    frames = fold(QUEUED, (ev.DELTA, {"content": "a"}), (ev.STATUS, {"status": ev.RESTARTED}),
                  (ev.DELTA, {"content": "b"}))
    assert frames[2:] == [(None, {"type": "text-end", "id": "text-1"}),
                          ("1-2", {"type": "error", "errorText": RESTARTED_TEXT}),
                          (None, {"type": "text-start", "id": "text-2"}),
                          ("1-3", {"type": "text-delta", "id": "text-2", "delta": "b"})]


def test_start_names_the_message_and_carries_no_id() -> None:
    """The start chunk is the route's, not an event's: no id line."""
    assert start_frame("msg_1") == b'data: {"type":"start","messageId":"msg_1"}\n\n'
