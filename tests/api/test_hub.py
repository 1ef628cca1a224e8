"""The hub and the SSE response in a real uvicorn server (in this process) on a private Redis.

The test plays the worker by appending entries to the generation's stream, and
the viewers are raw sockets, so disconnects and stalled readers are real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from redis.asyncio import Redis

from tokenrelay.api.app import create_app
from tokenrelay.api.deps import AppState
from tokenrelay.api.hub import Hub
from tokenrelay.cli.redis_server import RedisServer, free_port
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys
from tokenrelay.shared.settings import Settings


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
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serve(redis_server: RedisServer, **overrides: Any) -> AsyncIterator[Api]:
    settings = Settings(**{"redis_url": redis_server.url, "api_keys": None, **overrides})
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                            lifespan="on", timeout_graceful_shutdown=2)
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


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[Api]:
    """One API (heartbeat 0.2 s, send timeout 0.5 s) on a private redis-server, no worker."""
    async with serve(redis_server, heartbeat_s=0.2, send_timeout_s=0.5) as running:
        yield running


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

    async def read_to_eof(self, within: float = 10.0) -> bytes:
        deadline = time.monotonic() + within
        while chunk := await asyncio.wait_for(self.reader.read(65536),
                                              max(0.01, deadline - time.monotonic())):
            self.data += chunk
        return self.data

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


async def test_disconnect_frees_tasks_connections_and_hub_registration(api: Api) -> None:
    """Viewers that hang up, idle or mid-stream, leave no task, connection or registration."""
    gen_id = await create(api)
    baseline_tasks = len(asyncio.all_tasks())
    viewers = [await RawViewer.open(api, gen_id) for _ in range(20)]
    for viewer in viewers:
        await viewer.read_until(b'"queued"')
    assert api.hub.viewer_count == 20
    assert len(api.hub.connections) == 20
    assert api.hub.channels[gen_id].parked == 20
    assert len(asyncio.all_tasks()) >= baseline_tasks + 20  # each one holds at least a task

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
    await until(lambda: len(asyncio.all_tasks()) <= baseline_tasks, "every viewer task to end")


async def test_stalled_viewer_is_cut_and_the_others_get_everything(api: Api) -> None:
    """A viewer that stops reading is closed after the send timeout; the others miss nothing."""
    gen_id = await create(api)
    healthy = [await RawViewer.open(api, gen_id) for _ in range(3)]
    stalled = await RawViewer.open(api, gen_id, rcvbuf=4096)
    for viewer in healthy:
        await viewer.read_until(b'"queued"')
    await until(lambda: api.hub.viewer_count == 4, "four registrations")

    await append(api, gen_id, ev.STATUS, {"status": "running"})
    word = "x" * 8000
    for i in range(400):  # ~3 MB: far more than the stalled socket's buffers hold
        await append(api, gen_id, ev.DELTA, {"content": f"{i}{word}"})
        if i % 50 == 0:
            for viewer in healthy:
                await viewer.read_until(f'"content":"{i}x'.encode())
    await append(api, gen_id, ev.DONE, {"finish_reason": "length"})

    await until(lambda: api.hub.connections.stalled_total == 1, "the stalled viewer to be cut")
    expected = [eid.decode() for eid, _ in await api.redis.xrange(keys.events(gen_id))]
    for viewer in healthy:
        await viewer.read_to_eof()
        assert viewer.data.partition(b"\r\n\r\n")[2].startswith(b"d\r\nretry: 1000\n\n")
        assert viewer.data.endswith(b"0\r\n\r\n")  # the response ends after the terminal event
        assert [e.id for e in viewer.events()] == expected
    await until(lambda: api.hub.viewer_count == 0 and len(api.hub.connections) == 0,
                "every registration to go")
    stalled.close()


async def test_idle_viewer_gets_heartbeat_comments(api: Api) -> None:
    """While nothing happens, a viewer receives `: ping` comments and nothing else."""
    gen_id = await create(api)
    viewer = await RawViewer.open(api, gen_id)
    await viewer.read_until(b'"queued"')
    start = len(viewer.data)
    while viewer.data[start:].count(b": ping\n") < 3:  # a comment line, blank line or not
        chunk = await asyncio.wait_for(viewer.reader.read(4096), 10)
        assert chunk, "the server closed an idle stream"
        viewer.data += chunk
    assert [e.type for e in viewer.events()] == ["status"]
    viewer.close()


async def test_viewer_behind_the_channel_memory_catches_up_from_redis(
    redis_server: RedisServer,
) -> None:
    """With a tiny channel cap, a viewer far behind reads Redis, then memory: no gap, no dup."""
    async with serve(redis_server, hub_history_frames=8, send_timeout_s=30) as api:
        gen_id = await create(api)
        viewer = await RawViewer.open(api, gen_id, rcvbuf=4096)  # reads nothing for now
        await until(lambda: api.hub.viewer_count == 1, "the registration")
        await append(api, gen_id, ev.STATUS, {"status": "running"})
        async with api.redis.pipeline(transaction=False) as pipe:
            for i in range(2000):  # ~2 MB: more than the socket buffers hold
                fields = ev.entry_fields(ev.DELTA, {"content": f" {i}" + "y" * 1000})
                pipe.xadd(keys.events(gen_id), fields)  # type: ignore[arg-type]
            await pipe.execute()
        channel = api.hub.channels[gen_id]
        await until(lambda: channel.end >= 2002, "the hub to read every entry")
        assert channel.base > 0  # the viewer's part left memory
        viewer.writer.transport.resume_reading()  # type: ignore[attr-defined]
        await append(api, gen_id, ev.DONE, {"finish_reason": "length"})
        await viewer.read_to_eof(within=20)
        expected = [eid.decode() for eid, _ in await api.redis.xrange(keys.events(gen_id))]
        assert [e.id for e in viewer.events()] == expected
        assert api.hub.catchup_reads > 0  # it did go to Redis for the part memory had dropped
        viewer.close()


async def test_viewers_of_a_served_stream_are_authorised_from_memory(
    redis_server: RedisServer,
) -> None:
    """Once a stream is served here, more viewers cost no Redis reads; other tenants get 404."""
    async with serve(redis_server, api_keys="t1:k1,t2:k2") as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            created = await client.post("/v1/generations", headers={"Authorization": "Bearer k1"},
                                        json={"model": "fake:lorem", "prompt": "hub"})
            gen_id = created.json()["id"]
            path = f"/v1/generations/{gen_id}/events"
            async with client.stream("GET", path, headers={"Authorization": "Bearer k1"}) as one:
                assert one.status_code == 200
                await until(lambda: api.hub.viewer_count == 1, "the registration")
                await api.redis.config_resetstat()
                for _ in range(5):
                    async with client.stream("GET", path,
                                             headers={"Authorization": "Bearer k1"}) as more:
                        assert more.status_code == 200
                stats = await api.redis.info("commandstats")
                assert "cmdstat_hgetall" not in stats and "cmdstat_hget" not in stats
                other = await client.get(path, headers={"Authorization": "Bearer k2"})
                assert other.status_code == 404
                unknown = await client.get(f"/v1/generations/gen_{'0' * 32}/events",
                                           headers={"Authorization": "Bearer k1"})
                assert unknown.status_code == 404
                assert list(api.hub.channels) == [gen_id]  # nothing left behind by the 404s
                token = created.json()["stream_token"]
                async with client.stream("GET", f"{path}?token={token}") as shared:
                    assert shared.status_code == 200  # the share link still works


async def test_errors_of_the_events_route_keep_the_error_body(redis_server: RedisServer) -> None:
    """Bad id, credentials or Last-Event-ID on the events route get the documented 4xx bodies."""
    async with serve(redis_server, api_keys="t1:k1") as api:
        auth = {"Authorization": "Bearer k1"}
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            created = await client.post("/v1/generations", headers=auth,
                                        json={"model": "fake:lorem", "prompt": "hub"})
            path = f"/v1/generations/{created.json()['id']}/events"
            cases = [
                ("/v1/generations/nope/events", auth, 404, "not_found"),
                (f"/v1/generations/gen_{'0' * 32}/events", auth, 404, "not_found"),
                (path, {}, 401, "unauthorized"),
                (path, {**auth, "Last-Event-ID": "yesterday"}, 400, "invalid_event_id"),
                (f"{path}?token=forged", {}, 401, "unauthorized"),
            ]
            for url, headers, status, code in cases:
                response = await client.get(url, headers=headers)
                assert response.status_code == status, (url, response.text)
                assert response.json()["error"]["code"] == code, (url, response.text)
        assert api.hub.viewer_count == 0 and len(api.hub.connections) == 0
