"""A real uvicorn server (in this process) on a private Redis, for the read side's tests.

The tests play the worker by appending entries to the generation's stream, and
the viewers are raw sockets, so disconnects and stalled readers are real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from redis.asyncio import Redis

from tokenrelay.api.app import create_app
from tokenrelay.api.deps import AppState
from tokenrelay.api.hub import Hub
from tokenrelay.api.protocol import GuardedHttpToolsProtocol
from tokenrelay.cli.redis_server import RedisServer, free_port
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys
from tokenrelay.shared.settings import Settings

# uvicorn's own HTTP protocol (SSE through ASGI throughout), and ``tokenrelay api``'s (SSE
# streams take their connection over after their head).
HTTP_PROTOCOLS: dict[str, Any] = {"uvicorn": "auto", "tokenrelay api": GuardedHttpToolsProtocol}


@dataclass
class Api:
    url: str
    port: int
    state: AppState
    redis: Redis

    @property
    def hub(self) -> Hub:
        return self.state.hub


async def until(predicate: Callable[[], Any], what: str, within: float = 10.0) -> None:
    """Poll ``predicate`` (plain or async) until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serve(redis_server: RedisServer, ws: Any = "auto", http: Any = "auto",
                **overrides: Any) -> AsyncIterator[Api]:
    """``ws``, ``http``: uvicorn's WebSocket and HTTP protocols (names or classes)."""
    settings = Settings(**{"redis_url": redis_server.url, "api_keys": None, **overrides})
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                            lifespan="on", timeout_graceful_shutdown=2, ws=ws, http=http,
                            ws_per_message_deflate=ws == "auto")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started or task.done(), "the in-process server to start")
    assert not task.done(), "the server did not start"
    redis = Redis.from_url(redis_server.url)
    try:
        yield Api(f"http://127.0.0.1:{port}", port, app.state.tr, redis)
    finally:
        server.should_exit = True
        await task
        await redis.aclose()


async def create(api: Api) -> str:
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        response = await client.post("/v1/generations",
                                     json={"model": "fake:lorem", "prompt": "hub"})
    assert response.status_code == 202, response.text
    gen_id: str = response.json()["id"]
    return gen_id


async def append(api: Api, gen_id: str, event_type: str, data: dict[str, Any]) -> str:
    """Append one event as the worker would (the hub reads nothing but the stream)."""
    fields: dict[Any, Any] = ev.entry_fields(event_type, data)
    entry_id = await api.redis.xadd(keys.events(gen_id), fields)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class RawViewer:
    """A viewer on a plain socket: it reads only when told to, and can hang up at any time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.data = b""

    @classmethod
    async def open(cls, api: Api, gen_id: str, rcvbuf: int | None = None) -> RawViewer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", api.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        if rcvbuf is not None:
            writer.transport.pause_reading()  # type: ignore[attr-defined]  # never reads
        writer.write(f"GET /v1/generations/{gen_id}/events HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\n\r\n".encode())
        return cls(reader, writer)

    async def read_until(self, marker: bytes, within: float = 10.0) -> bytes:
        deadline = time.monotonic() + within
        while marker not in self.data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} in {self.data[-300:]!r}")
            chunk = await asyncio.wait_for(self.reader.read(65536), remaining)
            if not chunk:
                raise AssertionError(f"connection closed before {marker!r}")
            self.data += chunk
        return self.data

    async def request(self, head: bytes) -> None:
        """Send another request on the same connection (keep-alive, or pipelined)."""
        self.writer.write(head)
        await self.writer.drain()

    async def read_to_end(self, within: float = 10.0) -> bytes:
        """Everything up to the end of the chunked response body (the connection stays open)."""
        return await self.read_until(b"\r\n0\r\n\r\n", within)

    def events(self) -> list[ev.Event]:
        return ev.parse_sse(dechunk(self.data.partition(b"\r\n\r\n")[2]).decode())

    def close(self) -> None:
        self.writer.close()


def dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body (the test's own minimal decoder)."""
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


async def hang_up(api: Api, gen_id: str, viewers: list[RawViewer]) -> None:
    """Twenty viewers of ``gen_id`` hang up, ten while idle and ten while events flow; wait
    until nothing of them is left in the hub: registrations, connections, the channel."""
    assert len(viewers) == 20
    for viewer in viewers[:10]:  # idle viewers hang up
        viewer.close()
    await until(lambda: api.hub.viewer_count == 10 and len(api.hub.connections) == 10,
                "idle viewers to be released")

    await append(api, gen_id, ev.STATUS, {"status": "running"})
    for i in range(30):  # the other ten hang up while events flow
        await append(api, gen_id, ev.DELTA, {"content": f" w{i}"})
        if i < 10:
            viewers[10 + i].close()
    await until(lambda: api.hub.viewer_count == 0, "every hub registration to go")
    await until(lambda: len(api.hub.connections) == 0, "every connection to go")
    await until(lambda: gen_id not in api.hub.channels, "the channel to go")
