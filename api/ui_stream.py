"""A generation's events as the Vercel AI SDK's UI message stream (``useChat``'s protocol).

    native event             UI message chunks (``data: <json>``; the group's last frame
                             carries ``id: <event id>``, so a reconnect resumes after it)
    status queued / running  nothing
    delta reasoning          [text-end] reasoning-start, reasoning-delta
    delta content            [reasoning-end] text-start, text-delta
    delta tool_calls         [text-end | reasoning-end] tool-input-start, tool-input-delta
    done                     the open parts' ends (tool-input-available), finish, [DONE]
    cancelled                the open parts' ends, abort, [DONE]
    error                    the open parts' ends, error, [DONE]
    status restarted         nothing before any output; after output the open parts' ends
                             and an error part (text sent cannot be taken back; a resume
                             replays the answer from the restart, see api.ai_sdk)

A chunk's frame depends on which parts are open, so this is a :class:`Fold`: its frames
are computed once per event per process, from one state per channel folded from the
stream's first event. The ``start`` chunk, which names the assistant message, is not an
event's: the route writes it before a replay from the start (:func:`start_frame`).
"""

from __future__ import annotations

import json
from typing import Any

from tokenrelay.api.fold import Fold
from tokenrelay.shared import events as ev

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
DONE_FRAME = b"data: [DONE]\n\n"
# The finish reasons of the UI stream common to every version of the ai package.
FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool-calls",
                  "content_filter": "content-filter"}
RESTARTED_TEXT = ("the worker writing this answer was lost and it is being written again: "
                  "resume the stream to read it from its new start")

Chunk = dict[str, Any]


class _Tool:
    __slots__ = ("call_id", "name", "arguments")

    def __init__(self, call_id: str, name: str):
        self.call_id = call_id
        self.name = name
        self.arguments: list[str] = []


class UIState:
    """Which parts of the message are open, and the count that names the next one."""

    __slots__ = ("parts", "text", "reasoning", "tools", "output")

    def __init__(self) -> None:
        self.parts = 0
        self.text: str | None = None  # id of the open text part
        self.reasoning: str | None = None  # id of the open reasoning part
        self.tools: dict[int, _Tool] = {}  # open tool inputs by their OpenAI index
        self.output = False  # a part was sent (a restart can no longer be silent)

    def new_id(self, kind: str) -> str:
        self.parts += 1
        return f"{kind}-{self.parts}"


def start_frame(message_id: str) -> bytes:
    """The ``start`` chunk that opens a message (no ``id:``: it is not an event's)."""
    return _data({"type": "start", "messageId": message_id})


def step(state: UIState, event: ev.Event) -> bytes:
    """The frames of ``event`` after the events folded into ``state`` (which it updates)."""
    chunks: list[Chunk] = []
    end = False
    if event.type == ev.DELTA:
        data = event.data
        if data.get("reasoning"):
            _reasoning(state, chunks, str(data["reasoning"]))
        if data.get("content"):
            _text(state, chunks, str(data["content"]))
        for fragment in data.get("tool_calls") or []:
            if isinstance(fragment, dict):
                _tool_call(state, chunks, fragment)
    elif event.type == ev.STATUS:
        if event.data.get("status") == ev.RESTARTED and state.output:
            _close(state, chunks)
            chunks.append({"type": "error", "errorText": RESTARTED_TEXT})
            state.output = False
    elif event.type == ev.DONE:
        _close(state, chunks)
        reason = FINISH_REASONS.get(str(event.data.get("finish_reason") or "stop"), "other")
        chunks.append({"type": "finish", "finishReason": reason})
        end = True
    elif event.type == ev.CANCELLED:
        _close(state, chunks)
        chunks.append({"type": "abort"})
        end = True
    elif event.type == ev.ERROR:
        _close(state, chunks)
        message = str(event.data.get("message") or "the generation failed")
        chunks.append({"type": "error", "errorText": message})
        end = True
    if not chunks:
        return b""
    *head, last = chunks
    out = b"".join(map(_data, head)) + f"id: {event.id}\n".encode() + _data(last)
    return out + DONE_FRAME if end else out


def _reasoning(state: UIState, chunks: list[Chunk], delta: str) -> None:
    if state.reasoning is None:
        _close(state, chunks)
        state.reasoning = state.new_id("reasoning")
        chunks.append({"type": "reasoning-start", "id": state.reasoning})
    chunks.append({"type": "reasoning-delta", "id": state.reasoning, "delta": delta})
    state.output = True


def _text(state: UIState, chunks: list[Chunk], delta: str) -> None:
    if state.text is None:
        _close(state, chunks)
        state.text = state.new_id("text")
        chunks.append({"type": "text-start", "id": state.text})
    chunks.append({"type": "text-delta", "id": state.text, "delta": delta})
    state.output = True


def _tool_call(state: UIState, chunks: list[Chunk], fragment: dict[str, Any]) -> None:
    """One OpenAI ``tool_calls`` fragment: the call's id and name come with its first."""
    index = fragment.get("index", 0)
    index = index if isinstance(index, int) else 0
    function = fragment.get("function") or {}
    tool = state.tools.get(index)
    if tool is None:
        if state.text is not None or state.reasoning is not None:
            _close(state, chunks, tools=False)
        tool = state.tools[index] = _Tool(str(fragment.get("id") or state.new_id("call")),
                                          str(function.get("name") or ""))
        chunks.append({"type": "tool-input-start", "toolCallId": tool.call_id,
                       "toolName": tool.name, "dynamic": True})
        state.output = True
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        tool.arguments.append(arguments)
        chunks.append({"type": "tool-input-delta", "toolCallId": tool.call_id,
                       "inputTextDelta": arguments})


def _close(state: UIState, chunks: list[Chunk], *, tools: bool = True) -> None:
    """End every open part (tool inputs too, unless ``tools`` is False)."""
    if state.text is not None:
        chunks.append({"type": "text-end", "id": state.text})
        state.text = None
    if state.reasoning is not None:
        chunks.append({"type": "reasoning-end", "id": state.reasoning})
        state.reasoning = None
    if tools:
        for index in sorted(state.tools):
            chunks.append(_tool_input(state.tools[index]))
        state.tools = {}


def _tool_input(tool: _Tool) -> Chunk:
    """A call's whole input, parsed; its raw text with an error if it is not JSON."""
    raw = "".join(tool.arguments)
    try:
        parsed = json.loads(raw or "{}")
    except ValueError:
        return {"type": "tool-input-error", "toolCallId": tool.call_id, "toolName": tool.name,
                "input": raw, "dynamic": True, "errorText": "the arguments are not valid JSON"}
    return {"type": "tool-input-available", "toolCallId": tool.call_id, "toolName": tool.name,
            "input": parsed, "dynamic": True}


def _data(chunk: Chunk) -> bytes:
    return f"data: {ev.dumps(chunk)}\n\n".encode()


UI_STREAM: Fold[UIState] = Fold("ai-sdk", UIState, step)
