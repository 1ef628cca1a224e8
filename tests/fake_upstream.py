"""A local OpenAI-compatible Chat Completions server: the outside world, faked for tests.

It streams chat.completion.chunk events the way OpenAI does (content, reasoning_content,
tool-call fragments, a final usage chunk when ``stream_options.include_usage``), and
records what it saw, including whether the client closed the connection mid-stream.
Behaviour is chosen by the model name:

- ``slow``: 200 words, one every 50 ms (for cancel tests)
- ``tools``: a reasoning_content prelude, then two tool calls streamed in fragments
- ``tools-interleaved``: the same, with the two calls' fragments interleaved (parallel calls)
- ``tools-repeated``: the same, every fragment repeating its call's id and name (llama.cpp)
- ``status-NNN``: HTTP NNN with an OpenAI error body over two lines (``retry-after-ms: 10``)
- ``surrogate``: "bad", then a lone surrogate (JSON ``\\ud800``), then "text"
- ``cutoff``: a few words, then ``[DONE]`` with no finish reason; ``empty``: no word either
- ``paced-N``: the words of the last user message, N per second (benchmarks)
- anything else: the words of the last user message, quickly

``GET /v1/models`` lists ``model-a`` and ``model-b``, and counts the calls.
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

TOOL_CALLS = [
    {"id": "call_a1", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
    {"id": "call_b2", "name": "get_time", "arguments": '{"tz": "Europe/Paris"}'},
]
REASONING = ["Let me ", "think ", "about this."]


@dataclass
class Record:
    requests: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0
    model_lists: int = 0  # GET /v1/models calls
    disconnected: int = 0  # streams the client closed before their end
    disconnected_at: list[float] = field(default_factory=list)  # their time.monotonic()


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None,
           usage: dict[str, int] | None = None, choices: bool = True) -> str:
    body: dict[str, Any] = {
        "id": "chatcmpl-test", "object": "chat.completion.chunk",
        "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


def tool_call_fragments() -> list[dict[str, Any]]:
    """The tool-call deltas the server streams: id and name first, arguments in pieces."""
    out: list[dict[str, Any]] = []
    for index, call in enumerate(TOOL_CALLS):
        out.append({"index": index, "id": call["id"], "type": "function",
                    "function": {"name": call["name"], "arguments": ""}})
        args = call["arguments"]
        for start in range(0, len(args), 7):
            out.append({"index": index, "function": {"arguments": args[start:start + 7]}})
    return out


def repeated_name_fragments() -> list[dict[str, Any]]:
    """The same fragments as llama-cpp-python streams them: each repeats id, type and name."""
    by_index = {i: call for i, call in enumerate(TOOL_CALLS)}
    return [{**fragment, "id": by_index[fragment["index"]]["id"], "type": "function",
             "function": {**fragment["function"], "name": by_index[fragment["index"]]["name"]}}
            for fragment in tool_call_fragments()]


def interleaved_tool_call_deltas() -> list[list[dict[str, Any]]]:
    """The same two calls as parallel tool calls do arrive: calls open in index order, then
    fragments of both alternate, some chunks carrying one of each (only ``index`` says which
    call a fragment extends)."""
    per_call = [[f for f in tool_call_fragments() if f["index"] == i] for i in range(2)]
    out: list[list[dict[str, Any]]] = []
    for step in range(max(len(frags) for frags in per_call)):
        now = [frags[step] for frags in per_call if step < len(frags)]
        if step % 2:  # odd steps: one chunk with a fragment of each call
            out.append(now)
        else:  # even steps: one chunk each, the later call first once both are open
            out.extend([frag] for frag in (reversed(now) if step else now))
    return out


def build_app(record: Record) -> Starlette:
    async def completions(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        record.requests.append(body)
        model = body.get("model", "")
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "only stream=True here"}}, 400)
        usage_wanted = (body.get("stream_options") or {}).get("include_usage", False)
        if model.startswith("status-"):
            return JSONResponse(
                {"error": {"message": "upstream says no\nsecret detail", "type": "test"}},
                int(model.removeprefix("status-")), headers={"retry-after-ms": "10"})

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                yield _chunk(model, {"role": "assistant", "content": ""})
                words: list[str] = []
                finish = "stop"
                if model == "slow":
                    for i in range(200):
                        await asyncio.sleep(0.05)
                        words.append(f"w{i} ")
                        yield _chunk(model, {"content": f"w{i} "})
                elif model in ("cutoff", "empty"):
                    for word in ["cut", " off"] if model == "cutoff" else []:
                        yield _chunk(model, {"content": word})
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
                elif model == "surrogate":
                    for piece in ["bad ", "\ud800", " text"]:
                        words.append(piece)
                        yield _chunk(model, {"content": piece})
                elif model == "tools":
                    for piece in REASONING:
                        yield _chunk(model, {"reasoning_content": piece})
                    for fragment in tool_call_fragments():
                        yield _chunk(model, {"tool_calls": [fragment]})
                    finish = "tool_calls"
                elif model == "tools-repeated":
                    for piece in REASONING:
                        yield _chunk(model, {"reasoning_content": piece})
                    for fragment in repeated_name_fragments():
                        yield _chunk(model, {"tool_calls": [fragment]})
                    finish = "tool_calls"
                elif model == "tools-interleaved":
                    for piece in REASONING:
                        yield _chunk(model, {"reasoning_content": piece})
                    for group in interleaved_tool_call_deltas():
                        yield _chunk(model, {"tool_calls": group})
                    finish = "tool_calls"
                else:
                    users = [m for m in body["messages"] if m.get("role") == "user"]
                    tps = float(model.removeprefix("paced-")) if model.startswith("paced-") else 0
                    start = time.monotonic()
                    for i, word in enumerate(str(users[-1]["content"]).split()):
                        if tps and (delay := start + i / tps - time.monotonic()) > 0:
                            await asyncio.sleep(delay)
                        piece = word if i == 0 else " " + word
                        words.append(piece)
                        yield _chunk(model, {"content": piece})
                yield _chunk(model, {}, finish=finish)
                if usage_wanted:
                    completion = len(words) or len(tool_call_fragments())
                    yield _chunk(model, {}, usage={"prompt_tokens": 7,
                                                   "completion_tokens": completion,
                                                   "total_tokens": 7 + completion}, choices=False)
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if finished:
                    record.completed += 1
                else:
                    record.disconnected += 1
                    record.disconnected_at.append(time.monotonic())

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> JSONResponse:
        record.model_lists += 1
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "test"}
            for name in ("model-a", "model-b")]})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/models", models)])


@contextmanager
def fake_upstream() -> Iterator[tuple[str, Record]]:
    """Run the server on a free port in a thread; yield (base_url ending in /v1, record)."""
    record = Record()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(record), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake upstream did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", record
    finally:
        server.should_exit = True
        thread.join(10)
