"""A generation's native events, seen as an OpenAI Chat Completion: streamed chunks or one body.

    native event            chat.completion.chunk (each frame carries `id: <event id>`)
    first event             delta {"role": "assistant", "content": ""}
    delta content           delta {"content"}
    delta reasoning         delta {"reasoning_content"}   (DeepSeek / DashScope / vLLM name)
    delta tool_calls        delta {"tool_calls"}          (already the OpenAI shape: index, id...)
    done                    finish_reason chunk, usage chunk (include_usage), data: [DONE]
    cancelled / error       data: {"error": {...}}        (the SDK raises APIError)
    status restarted        nothing before any output; after output an error, because
                            text already sent cannot be taken back on this wire

The native ``id`` on every frame lets a client that knows tokenrelay resume from
``/v1/generations/{id}/events`` with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from tokenrelay.api.openai_errors import OpenAIError
from tokenrelay.shared import events as ev

T = TypeVar("T")

ROLE_DELTA = {"role": "assistant", "content": ""}
DONE_FRAME = b"data: [DONE]\n\n"
# A heartbeat comment with no blank line after it: a blank line after an `id:` line
# makes the openai SDK's and httpx-sse's decoders emit an event with empty data,
# which they then fail to parse as JSON. A lone comment line is ignored by all of
# them and by EventSource, and still keeps proxies from timing the stream out.
HEARTBEAT = b": ping\n"


def failure(gen_id: str, event: ev.Event) -> OpenAIError:
    """What a ``cancelled`` or ``error`` terminal event means to an OpenAI client."""
    if event.type == ev.CANCELLED:
        return OpenAIError(409, "cancelled", f"generation {gen_id} was cancelled",
                           headers={"x-should-retry": "false"})
    code = str(event.data.get("code") or "internal_error")
    retryable = bool(event.data.get("retryable"))
    return OpenAIError(
        504 if code == "timeout" else 502,
        code,
        str(event.data.get("message") or "the generation failed"),
        type_="server_error",
        # The SDK retries 5xx unless told otherwise; a retry is a new generation.
        headers={"x-should-retry": "true" if retryable else "false"},
    )


def restarted(gen_id: str) -> OpenAIError:
    return OpenAIError(
        502, "generation_restarted",
        f"the worker of generation {gen_id} was lost and it restarted from the beginning; "
        f"read it again from /v1/generations/{gen_id}/events",
        type_="server_error",
    )


def _delta(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "content" in data:
        out["content"] = data["content"]
    if "reasoning" in data:
        out["reasoning_content"] = data["reasoning"]
    if "tool_calls" in data:
        out["tool_calls"] = data["tool_calls"]
    return out


class ChunkStream:
    """Translates one generation's events into ``chat.completion.chunk`` SSE frames."""

    def __init__(self, gen_id: str, model: str, created: int, include_usage: bool):
        self.gen_id = gen_id
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.finished = False
        self._began = False
        self._output = False

    def frames(self, event: ev.Event) -> bytes:
        out: list[bytes] = []
        if not self._began:
            self._began = True
            out.append(self._frame(event.id, self._chunk(ROLE_DELTA)))
        if event.type == ev.DELTA:
            delta = _delta(event.data)
            if delta:
                self._output = True
                out.append(self._frame(event.id, self._chunk(delta)))
        elif event.type == ev.STATUS:
            if event.data.get("status") == ev.RESTARTED and self._output:
                out.append(self._error(event.id, restarted(self.gen_id)))
        elif event.type == ev.DONE:
            reason = event.data.get("finish_reason") or "stop"
            out.append(self._frame(event.id, self._chunk({}, reason)))
            if self.include_usage:
                usage_chunk = self._chunk(None)
                usage_chunk["usage"] = event.data.get("usage")
                out.append(self._frame(event.id, usage_chunk))
            out.append(DONE_FRAME)
            self.finished = True
        elif event.terminal:
            out.append(self._error(event.id, failure(self.gen_id, event)))
        return b"".join(out)

    def _chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None
               ) -> dict[str, Any]:
        choices = [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]
        chunk: dict[str, Any] = {
            "id": self.gen_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the last
        return chunk

    def fail(self, exc: OpenAIError) -> bytes:
        """The error frame that ends a stream which cannot go on (storage lost, events expired)."""
        self.finished = True
        return f"data: {ev.dumps(exc.body())}\n\n".encode()

    def _error(self, event_id: str, exc: OpenAIError) -> bytes:
        self.finished = True
        return self._frame(event_id, exc.body())

    @staticmethod
    def _frame(event_id: str, data: dict[str, Any]) -> bytes:
        return f"id: {event_id}\ndata: {ev.dumps(data)}\n\n".encode()


class Completion:
    """Assembles one generation's events into a ``chat.completion`` body."""

    def __init__(self, gen_id: str, model: str, created: int):
        self.gen_id = gen_id
        self.model = model
        self.created = created
        self.terminal: ev.Event | None = None
        self._reset()

    def _reset(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}

    def feed(self, event: ev.Event) -> bool:
        """Take one event; True once the terminal event has been taken."""
        if event.type == ev.STATUS and event.data.get("status") == ev.RESTARTED:
            self._reset()  # the new attempt streams the answer again from the start
        elif event.type == ev.DELTA:
            if "content" in event.data:
                self.content.append(event.data["content"])
            if "reasoning" in event.data:
                self.reasoning.append(event.data["reasoning"])
            for fragment in event.data.get("tool_calls") or []:
                self._merge_tool_call(fragment)
        elif event.terminal:
            self.terminal = event
        return self.terminal is not None

    def _merge_tool_call(self, fragment: dict[str, Any]) -> None:
        # As the openai SDK accumulates, except that an id repeated by a provider stays one id.
        call = self.tool_calls.setdefault(
            int(fragment.get("index", 0)), {"id": "", "type": "function",
                                             "function": {"name": "", "arguments": ""}}
        )
        if fragment.get("id"):
            call["id"] = fragment["id"]
        if fragment.get("type"):
            call["type"] = fragment["type"]
        function = fragment.get("function") or {}
        name = function.get("name")
        if name and name != call["function"]["name"]:  # a repeated whole name is one name
            call["function"]["name"] += name
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]

    def body(self) -> dict[str, Any]:
        """The ``chat.completion``; OpenAIError if the generation did not complete."""
        if self.terminal is None:
            raise RuntimeError("the generation has not ended")
        if self.terminal.type != ev.DONE:
            raise failure(self.gen_id, self.terminal)
        text = "".join(self.content)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not self.tool_calls else None,
            "refusal": None,
        }
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        return {
            "id": self.gen_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": self.terminal.data.get("finish_reason") or "stop",
            }],
            "usage": self.terminal.data.get("usage"),
        }


async def _next(source: AsyncIterator[T]) -> T:
    return await anext(source)


async def with_heartbeat(
    source: AsyncIterator[T], every_s: float
) -> AsyncGenerator[T | None, None]:
    """``source``'s items, and None whenever it has been quiet for ``every_s``.

    The pending read is never cancelled by a tick, only when the consumer stops.
    """
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(source))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
