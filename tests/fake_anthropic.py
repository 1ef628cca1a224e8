"""A local Anthropic Messages API server: the outside world, faked for tests.

It answers ``POST /v1/messages`` with ``stream: true`` in Anthropic's SSE format
(``event: NAME`` / ``data: JSON`` frames: message_start, content_block_start /
delta / stop, ping, message_delta with stop_reason and usage, message_stop, and
``error`` events), answers failures with Anthropic's error bodies and statuses,
and records what it saw, including whether the client closed the connection
before the end. Behaviour is chosen by the model name:

- ``thinking``: a thinking block (thinking_delta, signature_delta), then the echo
- ``tools``: a thinking block, then two tool_use blocks, input_json_delta in fragments
- ``tool-noargs``: one tool_use block whose input arrives as a single empty fragment
- ``max-tokens`` / ``stop-sequence``: the echo, ending with that stop_reason
- ``slow``: 200 words, one every 50 ms (for cancel tests)
- ``cut``: a few words, then the body ends with no message_delta or message_stop
- ``overloaded``: a few words, then an ``error`` event (overloaded_error)
- ``status-NNN``: HTTP NNN with Anthropic's error body, before any stream
- anything else: the words of the last user message, quickly (stop_reason end_turn)

A wrong API key (x-api-key or Authorization: Bearer) is a 401 authentication_error.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tokenrelay.cli.redis_server import free_port

API_KEY = "test-anthropic-key"
INPUT_TOKENS = 11
THINKING = ["Let me ", "think ", "about this."]
TOOL_USES = [
    {"id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris", "unit": "c"}},
    {"id": "toolu_02B", "name": "get_time", "input": {"tz": "Europe/Paris"}},
]
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
    429: "rate_limit_error", 500: "api_error", 503: "api_error", 529: "overloaded_error",
}


@dataclass
class Record:
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    completed: int = 0  # streams sent to their end
    disconnected: int = 0  # streams the client closed before their end


def frame(event: str, data: dict[str, Any]) -> str:
    """One server-sent event as Anthropic sends it: the name twice, as ``event:`` and ``type``."""
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"


def argument_fragments(tool_input: dict[str, Any]) -> list[str]:
    """The input_json_delta pieces of one tool_use block: an empty one first, then 7-char cuts."""
    text = json.dumps(tool_input)
    return ["", *(text[start:start + 7] for start in range(0, len(text), 7))]


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": "req_test"}


class Blocks:
    """Frames of content blocks, numbered in the order they open."""

    def __init__(self) -> None:
        self.index = -1

    def start(self, block: dict[str, Any]) -> str:
        self.index += 1
        return frame("content_block_start", {"index": self.index, "content_block": block})

    def delta(self, delta: dict[str, Any]) -> str:
        return frame("content_block_delta", {"index": self.index, "delta": delta})

    def stop(self) -> str:
        return frame("content_block_stop", {"index": self.index})


def build_app(record: Record) -> Starlette:
    async def messages(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        record.requests.append(body)
        record.headers.append(dict(request.headers))
        model = str(body.get("model", ""))
        key = request.headers.get("x-api-key") or request.headers.get(
            "authorization", "").removeprefix("Bearer ")
        if key != API_KEY:
            return JSONResponse(error_body(401, "invalid x-api-key"), 401)
        if model.startswith("status-"):
            status = int(model.removeprefix("status-"))
            return JSONResponse(error_body(status, f"status {status} on purpose"), status)
        if not body.get("stream") or not isinstance(body.get("max_tokens"), int):
            return JSONResponse(error_body(400, "stream and max_tokens are required here"), 400)
        users = [m for m in body["messages"] if m["role"] == "user"]
        words = _text(users[-1]["content"]).split() if users else []

        async def events() -> AsyncIterator[str]:
            finished = False
            blocks = Blocks()
            output = 0
            stop_reason = {"max-tokens": "max_tokens",
                           "stop-sequence": "stop_sequence"}.get(model, "end_turn")
            try:
                yield frame("message_start", {"message": {
                    "id": "msg_test", "type": "message", "role": "assistant", "content": [],
                    "model": model, "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}})
                if model in ("thinking", "tools"):
                    yield blocks.start({"type": "thinking", "thinking": "", "signature": ""})
                    for piece in THINKING:
                        yield blocks.delta({"type": "thinking_delta", "thinking": piece})
                        output += 1
                    yield blocks.delta({"type": "signature_delta", "signature": "c2lnbmVk"})
                    yield blocks.stop()
                if model == "tools":
                    for tool in TOOL_USES:
                        yield blocks.start({"type": "tool_use", "id": tool["id"],
                                            "name": tool["name"], "input": {}})
                        for piece in argument_fragments(tool["input"]):
                            yield blocks.delta({"type": "input_json_delta", "partial_json": piece})
                            output += 1
                        yield blocks.stop()
                    stop_reason = "tool_use"
                elif model == "tool-noargs":
                    yield blocks.start({"type": "tool_use", "id": "toolu_03C", "name": "now",
                                        "input": {}})
                    yield blocks.delta({"type": "input_json_delta", "partial_json": ""})
                    yield blocks.stop()
                    stop_reason = "tool_use"
                else:
                    yield blocks.start({"type": "text", "text": ""})
                    yield frame("ping", {})
                    pieces = ([f"w{i} " for i in range(200)] if model == "slow" else
                              [w if i == 0 else " " + w for i, w in enumerate(words)])
                    for i, piece in enumerate(pieces):
                        if model == "slow":
                            await asyncio.sleep(0.05)
                        if model in ("cut", "overloaded") and i == 2:
                            break
                        yield blocks.delta({"type": "text_delta", "text": piece})
                        output += 1
                    if model == "cut":
                        finished = True
                        return  # the body ends here: no block stop, no message_delta/stop
                    if model == "overloaded":
                        finished = True
                        yield frame("error", {"error": {"type": "overloaded_error",
                                                        "message": "Overloaded"}})
                        return
                    yield blocks.stop()
                yield frame("message_delta", {
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output}})
                finished = True  # set before the last frame: a client may hang up right after it
                yield frame("message_stop", {})
            finally:
                if finished:
                    record.completed += 1
                else:
                    record.disconnected += 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content if b.get("type") == "text")


@contextmanager
def fake_anthropic() -> Iterator[tuple[str, Record]]:
    """Run the server on a free port in a thread; yield (base_url, record)."""
    record = Record()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(record), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake anthropic did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", record
    finally:
        server.should_exit = True
        thread.join(10)
