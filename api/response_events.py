"""A generation's native events, seen as the OpenAI Responses API's stream: a fold.

Each Responses event carries a ``sequence_number`` and refers to output items opened by
the events before it, so the frames are a fold (:mod:`tokenrelay.api.fold`) over the
stream from its first event: the same on every API process and every resume.

    native event             Responses events (each numbered by the next sequence_number)
    status queued (first)    response.created        (the response's fixed fields ride on
                                                     this event, under ``response``)
    status running (first)   response.in_progress
    delta reasoning          [output_item.added reasoning, content_part.added]
                             response.reasoning_text.delta
    delta content            [output_item.added message, content_part.added]
                             response.output_text.delta
    delta tool_calls         [output_item.added function_call] function_call_arguments.delta
    status restarted         the open items end ``incomplete`` and leave the output (text
                             sent cannot be taken back); the new attempt opens new items
    done                     response.completed, or response.incomplete (finish_reason
                             length: max_output_tokens; content_filter)
    cancelled                response.failed with status ``cancelled`` (the SDK has no
                             cancelled event; its status is OpenAI's for a cancelled response)
    error                    response.failed with ``error: {code, message}``

A new kind of output closes the open items of the other kinds (their ``…done`` events,
then ``output_item.done``), and a terminal event closes every open item first, so every
item added is done before the response ends, as the SDK's stream helper requires.
"""

from __future__ import annotations

from typing import Any

from tokenrelay.api.fold import Fold
from tokenrelay.shared import events as ev

MESSAGE = "message"
REASONING = "reasoning"
CALL = "function_call"
_ID_PREFIX = {MESSAGE: "msg", REASONING: "rs", CALL: "fc"}


class Item:
    """One output item: a message, a reasoning text, or a function call."""

    __slots__ = ("kind", "id", "pieces", "status", "call_id", "name")

    def __init__(self, kind: str, item_id: str, call_id: str = "", name: str = ""):
        self.kind = kind
        self.id = item_id
        self.pieces: list[str] = []  # text, reasoning or arguments, joined when shown
        self.status = "in_progress"
        self.call_id = call_id
        self.name = name

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def part(self) -> dict[str, Any]:
        """Its content part (messages and reasoning), with the text so far."""
        if self.kind == MESSAGE:
            return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": self.text}

    def body(self, *, empty: bool = False) -> dict[str, Any]:
        """The item as OpenAI shows it; ``empty``: as added, before any delta."""
        if self.kind == CALL:
            return {"id": self.id, "type": CALL, "status": self.status, "call_id": self.call_id,
                    "name": self.name, "arguments": "" if empty else self.text}
        content = [] if empty else [self.part()]
        if self.kind == MESSAGE:
            return {"id": self.id, "type": MESSAGE, "status": self.status, "role": "assistant",
                    "content": content}
        return {"id": self.id, "type": REASONING, "status": self.status, "summary": [],
                "content": content}


class ResponseState:
    """The response as the events so far describe it, and the next sequence number."""

    __slots__ = ("head", "seq", "status", "items", "dropped", "open", "calls", "usage",
                 "error", "incomplete", "completed_at")

    def __init__(self) -> None:
        self.head: dict[str, Any] | None = None  # the fixed fields; None: not a response
        self.seq = 0
        self.status = "queued"
        self.items: list[Item] = []  # every item added, by output_index
        self.dropped: set[int] = set()  # items of an attempt lost to a restart
        self.open: dict[str, int] = {}  # MESSAGE / REASONING -> output_index of the open one
        self.calls: dict[int, int] = {}  # the upstream's tool-call index -> output_index
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.completed_at: int | None = None

    @property
    def ended(self) -> bool:
        return self.status not in ("queued", "in_progress")

    @property
    def output(self) -> list[Item]:
        return [item for index, item in enumerate(self.items) if index not in self.dropped]

    @property
    def output_text(self) -> str:
        return "".join(item.text for item in self.output if item.kind == MESSAGE)

    def response(self) -> dict[str, Any]:
        """The Response object (``GET /v1/responses/{id}``, and in lifecycle events)."""
        return {
            **(self.head or {}),
            "status": self.status,
            "output": [item.body() for item in self.output],
            "usage": self.usage,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "completed_at": self.completed_at,
        }


def usage(native: dict[str, Any] | None) -> dict[str, Any] | None:
    """A native ``usage`` in the Responses shape."""
    if not native:
        return None
    given = int(native.get("prompt_tokens") or 0)
    made = int(native.get("completion_tokens") or 0)
    return {
        "input_tokens": given,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": made,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": int(native.get("total_tokens") or given + made),
    }


class _Writer:
    """Appends numbered Responses events of one native event to ``out``."""

    __slots__ = ("state", "out")

    def __init__(self, state: ResponseState):
        self.state = state
        self.out: list[bytes] = []

    def emit(self, event_type: str, **fields: Any) -> None:
        state = self.state
        data = {"type": event_type, "sequence_number": state.seq, **fields}
        state.seq += 1
        self.out.append(f"event: {event_type}\ndata: {ev.dumps(data)}\n\n".encode())

    def lifecycle(self, event_type: str) -> None:
        self.emit(event_type, response=self.state.response())

    def open(self, kind: str, call_id: str = "", name: str = "") -> int:
        state = self.state
        index = len(state.items)
        hexid = str((state.head or {}).get("id", "")).removeprefix("resp_")
        item = Item(kind, f"{_ID_PREFIX[kind]}_{hexid}_{index}", call_id, name)
        state.items.append(item)
        self.emit("response.output_item.added", output_index=index, item=item.body(empty=True))
        if kind != CALL:
            state.open[kind] = index
            part = {**item.part(), "text": ""}
            self.emit("response.content_part.added", item_id=item.id, output_index=index,
                      content_index=0, part=part)
        return index

    def close(self, index: int, status: str) -> None:
        item = self.state.items[index]
        item.status = status
        where = {"item_id": item.id, "output_index": index}
        if item.kind == CALL:
            self.emit("response.function_call_arguments.done", **where, arguments=item.text,
                      name=item.name)
        else:
            if item.kind == MESSAGE:
                self.emit("response.output_text.done", **where, content_index=0,
                          text=item.text, logprobs=[])
            else:
                self.emit("response.reasoning_text.done", **where, content_index=0,
                          text=item.text)
            self.emit("response.content_part.done", **where, content_index=0, part=item.part())
        self.emit("response.output_item.done", output_index=index, item=item.body())

    def close_all(self, status: str, keep: str | None = None) -> None:
        """Close every open item (but those of kind ``keep``), in output order."""
        state = self.state
        closing = [i for kind, i in state.open.items() if kind != keep]
        if keep != CALL:
            closing += state.calls.values()
            state.calls = {}
        state.open = {kind: i for kind, i in state.open.items() if kind == keep}
        for index in sorted(closing):
            self.close(index, status)

    def current(self, kind: str) -> Item:
        """The open item of ``kind`` (message or reasoning), opened after closing others."""
        state = self.state
        index = state.open.get(kind)
        if index is None:
            self.close_all("completed", keep=kind)
            index = self.open(kind)
        return state.items[index]

    def delta(self, data: dict[str, Any]) -> None:
        reasoning = data.get("reasoning")
        if reasoning:
            item = self.current(REASONING)
            item.pieces.append(reasoning)
            self.emit("response.reasoning_text.delta", item_id=item.id,
                      output_index=self.state.open[REASONING], content_index=0, delta=reasoning)
        content = data.get("content")
        if content:
            item = self.current(MESSAGE)
            item.pieces.append(content)
            self.emit("response.output_text.delta", item_id=item.id,
                      output_index=self.state.open[MESSAGE], content_index=0, delta=content,
                      logprobs=[])
        for fragment in data.get("tool_calls") or []:
            self.tool_call(fragment)

    def tool_call(self, fragment: dict[str, Any]) -> None:
        state = self.state
        self.close_all("completed", keep=CALL)
        key = int(fragment.get("index") or 0)
        function = fragment.get("function") or {}
        index = state.calls.get(key)
        if index is None:
            call_id = str(fragment.get("id") or f"call_{len(state.items)}")
            index = state.calls[key] = self.open(CALL, call_id, str(function.get("name") or ""))
        item = state.items[index]
        if function.get("name") and not item.name:
            item.name = str(function["name"])
        arguments = function.get("arguments")
        if arguments:
            item.pieces.append(str(arguments))
            self.emit("response.function_call_arguments.delta", item_id=item.id,
                      output_index=index, delta=str(arguments))

    def end(self, event: ev.Event) -> None:
        state = self.state
        state.completed_at = ev.parse_id(event.id)[0] // 1000
        if event.type == ev.DONE:
            reason = event.data.get("finish_reason")
            state.usage = usage(event.data.get("usage"))
            if reason in ("length", "content_filter"):
                state.status = "incomplete"
                state.incomplete = {
                    "reason": "max_output_tokens" if reason == "length" else reason}
                self.close_all("incomplete")
                self.lifecycle("response.incomplete")
                return
            state.status = "completed"
            self.close_all("completed")
            self.lifecycle("response.completed")
            return
        self.close_all("incomplete")
        if event.type == ev.CANCELLED:
            state.status = "cancelled"
        else:
            state.status = "failed"
            state.error = {"code": str(event.data.get("code") or "server_error"),
                           "message": str(event.data.get("message") or "the response failed")}
        self.lifecycle("response.failed")


def step(state: ResponseState, event: ev.Event) -> bytes:
    """Fold ``event`` into ``state``; its Responses events as SSE frames (b"" for none)."""
    if state.head is None:
        response = event.data.get("response") if event.type == ev.STATUS else None
        if not isinstance(response, dict):
            return b""  # not a generation made by POST /v1/responses
        state.head = response
        writer = _Writer(state)
        writer.lifecycle("response.created")
        return b"".join(writer.out)
    if state.ended:
        return b""
    writer = _Writer(state)
    if event.type == ev.DELTA:
        writer.delta(event.data)
    elif event.type == ev.STATUS:
        status = event.data.get("status")
        if status == ev.RUNNING and state.status == "queued":
            state.status = "in_progress"
            writer.lifecycle("response.in_progress")
        elif status == ev.RESTARTED:
            before = set(state.open.values()) | set(state.calls.values())
            writer.close_all("incomplete")
            state.dropped |= before
    elif event.terminal:
        writer.end(event)
    return b"".join(writer.out)


def fold(events: list[ev.Event], state: ResponseState | None = None) -> ResponseState:
    """``state`` (a new one by default) after ``events``, without keeping the frames."""
    state = state or ResponseState()
    for event in events:
        step(state, event)
    return state


RESPONSES: Fold[ResponseState] = Fold("responses", ResponseState, step)


def sequence_number(frame: bytes) -> int:
    """The ``sequence_number`` of one frame written by this module (the first one in it:
    it precedes every field that could quote the name)."""
    at = frame.index(b'"sequence_number":') + len(b'"sequence_number":')
    end = at
    while frame[end : end + 1].isdigit():
        end += 1
    return int(frame[at:end])


def after_sequence(chunk: bytes, last: int) -> bytes:
    """The frames of ``chunk`` numbered above ``last``."""
    frames = chunk.split(b"\n\n")
    for i, frame in enumerate(frames):
        if frame and sequence_number(frame) > last:
            return b"\n\n".join(frames[i:])
    return b""
