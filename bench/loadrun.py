"""Building blocks of the load scenarios: servers under test, held generations, accounting.

A "held" generation is created while no worker runs, so its stream holds only
``status: queued``; viewers connect and receive that event, and only then is a
worker started. Every later event is live for every viewer, as in the reference
figures (all viewers connected before the first event). The harness itself
sends Redis nothing while a scenario is measured (commands are counted).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis as redis_sync

from bench.common import ROOT, CpuMeter, Stack, host_port, rss, summary, wait_until
from bench.sseclient import (
    SEQ_BITS,
    Viewer,
    open_many,
    open_viewer,
    pack_id,
    request_bytes,
    unpack_id,
)
from tokenrelay.cli.redis_server import free_port
from tokenrelay.shared import keys


@dataclass
class Server:
    """An HTTP server that serves ``/v1/generations/{id}/events``: tokenrelay's or the naive one."""

    name: str
    url: str
    pid: int


def tokenrelay_server(stack: Stack) -> Server:
    return Server("tokenrelay", stack.url, stack.apis[0].pid)


class NaiveServer:
    """bench/naive_server.py in its own process, on the stack's Redis."""

    def __init__(self, redis_url: str):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="tr-naive-", suffix=".log", delete=False)
        self.popen = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "naive_server.py"), "--port", str(self.port),
             "--redis-url", redis_url],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.server = Server("naive", f"http://127.0.0.1:{self.port}", self.popen.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.server.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.popen.poll() is not None:
                self.stop()
                raise RuntimeError("the naive server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def create_generation(base_url: str, max_tokens: int, model: str = "fake:lorem") -> str:
    response = httpx.post(
        f"{base_url}/v1/generations",
        json={"model": model, "prompt": "bench", "max_tokens": max_tokens},
        timeout=30,
    )
    response.raise_for_status()
    gen_id: str = response.json()["id"]
    return gen_id


def stream_ids(redis_url: str, gen_id: str) -> list[int]:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        return [pack_id(eid) for eid, _ in client.xrange(keys.events(gen_id))]
    finally:
        client.close()


def account(viewers: list[Viewer], canonical: list[int]) -> tuple[int, int, int]:
    """(lost, duplicates, incomplete) summed over viewers, against the stream in Redis."""
    expected = set(canonical)
    lost = duplicates = incomplete = 0
    for viewer in viewers:
        got = viewer.ids.tolist()
        seen = set(got)
        duplicates += len(got) - len(seen)
        lost += len(expected - seen)
        if viewer.terminal is None:
            incomplete += 1
    return lost, duplicates, incomplete


def redis_commandstats(redis_url: str) -> dict[str, int]:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def reset_commandstats(redis_url: str) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        client.config_resetstat()
    finally:
        client.close()


# (n, host, port, generation id, latencies) -> the n viewers and their connections.
Opener = Callable[[int, str, int, str, "array[float]"], Awaitable[list[tuple[Viewer, Any]]]]


@dataclass
class FanoutResult:
    server: str
    n: int
    events: int  # events in the stream (canonical)
    latency: dict[str, float]
    lost: int  # events missing, summed over viewers
    duplicates: int  # events received twice or more, summed over viewers
    incomplete: int  # viewers that did not get the terminal event
    errors: list[str]
    cpu: dict[str, float]
    connect_s: float
    stalled: int = 0
    commands: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        lat = self.latency
        cpu = self.cpu
        stalled = f" (+{self.stalled} stalled)" if self.stalled else ""
        return (
            f"{self.server:10s} N={self.n:5d}{stalled}  p50 {lat['p50']:7.1f} ms  "
            f"p99 {lat['p99']:7.1f} ms  max {lat['max']:7.1f} ms  lost {self.lost}  "
            f"dup {self.duplicates}  incomplete {self.incomplete}  "
            f"CPU server {cpu.get('server', 0) * 100:.0f}% worker {cpu.get('worker', 0) * 100:.0f}%"
            f" redis {cpu.get('redis', 0) * 100:.0f}% client {cpu.get('client', 0) * 100:.0f}%"
            f" others {cpu.get('others', 0) * 100:.0f}% steal {cpu.get('steal', 0) * 100:.0f}%"
        )


async def _until_started(viewer: Viewer, within: float) -> None:
    """Wait until the first viewer has seen an event after ``queued`` (the worker began)."""
    await wait_until(lambda: len(viewer.ids) >= 2 or viewer.closed is None
                     or viewer.closed.done(), within, "the worker to start", interval=0.005)


async def fanout(
    stack: Stack,
    server: Server,
    n: int,
    tokens: int,
    stall: int = 0,
    count_commands: bool = False,
    opener: Opener | None = None,
) -> FanoutResult:
    """One held generation of ``tokens`` deltas watched by ``n`` viewers on ``server``.

    ``stall`` more connections open the stream with a tiny receive buffer and never
    read: their socket fills up and the server must not wait for them. ``opener``: how
    the ``n`` viewers connect (default: SSE; bench/ws.py passes its WebSocket viewers).
    """
    gen_id = create_generation(stack.url, tokens)
    host, port = host_port(server.url)
    request = request_bytes("GET", f"/v1/generations/{gen_id}/events", f"{host}:{port}")
    latencies: array = array("d")  # type: ignore[type-arg]
    if count_commands:
        reset_commandstats(stack.redis_url)
    t0 = time.monotonic()
    if opener is None:
        pairs: list[tuple[Viewer, Any]] = await open_many(n, host, port, lambda i: request,
                                                          latencies)
    else:
        pairs = await opener(n, host, port, gen_id, latencies)
    stalled = await open_many(stall, host, port, lambda i: request, array("d"), rcvbuf=4096)
    viewers = [v for v, _ in pairs]
    everyone = viewers + [v for v, _ in stalled]
    await wait_until(lambda: all(v.ids or v.error or (v.closed and v.closed.done())
                                 for v in everyone),
                     120, f"{n} viewers to receive the queued event")
    for _, proto in stalled:
        assert proto.transport is not None
        proto.transport.pause_reading()
    connect_s = time.monotonic() - t0
    errors = [v.error for v in everyone if v.error]
    del latencies[:]  # the queued event was a replay; measure live events only

    worker = stack.add_worker()
    try:
        await _until_started(viewers[0], 60)
        pids = {"server": server.pid, "worker": worker.pid}
        if stack.redis is not None and stack.redis.process is not None:
            pids["redis"] = stack.redis.process.pid
        cpu = CpuMeter(pids).start()
        closed = [v.closed for v in viewers if v.closed is not None]
        await asyncio.wait(closed, timeout=tokens / 50 * 3 + 30)
        cpu_result = cpu.stop()
        commands = redis_commandstats(stack.redis_url) if count_commands else {}
    finally:
        worker.stop()
        stack.workers.remove(worker)
        for _, proto in [*pairs, *stalled]:
            proto.close()
    canonical = stream_ids(stack.redis_url, gen_id)
    lost, duplicates, incomplete = account(viewers, canonical)
    return FanoutResult(
        server=server.name, n=n, events=len(canonical), latency=summary(latencies),
        lost=lost, duplicates=duplicates, incomplete=incomplete, errors=errors[:5],
        cpu=cpu_result, connect_s=connect_s, stalled=stall, commands=commands,
        extra={"gen_id": gen_id},
    )


async def idle_memory(stack: Stack, server: Server, n: int,
                      opener: Opener | None = None) -> dict[str, float]:
    """RSS growth of ``server`` per idle viewer, with ``n`` viewers on one quiet generation
    (``opener``: as for :func:`fanout`; default SSE)."""
    gen_id = create_generation(stack.url, 10)
    host, port = host_port(server.url)
    request = request_bytes("GET", f"/v1/generations/{gen_id}/events", f"{host}:{port}")
    latencies: array = array("d")  # type: ignore[type-arg]

    async def open_viewers(count: int) -> list[tuple[Viewer, Any]]:
        if opener is None:
            return list(await open_many(count, host, port, lambda i: request, latencies))
        return await opener(count, host, port, gen_id, latencies)

    # Warm the server up (first request, imports, pools), then take the baseline.
    warm = await open_viewers(10)
    await wait_until(lambda: all(v.ids for v, _ in warm), 30, "warm-up viewers")
    for _, proto in warm:
        proto.close()
    await asyncio.sleep(1.0)  # let the server release them (a settle, not a condition)
    before = rss(server.pid)
    pairs = await open_viewers(n)
    await wait_until(lambda: all(v.ids or v.error for v, _ in pairs), 180,
                     f"{n} idle viewers to receive the queued event")
    await asyncio.sleep(1.0)
    after = rss(server.pid)
    errors = [v.error for v, _ in pairs if v.error]
    for _, proto in pairs:
        proto.close()
    return {"n": n, "rss_before_mib": before / 2**20, "rss_after_mib": after / 2**20,
            "kib_per_viewer": (after - before) / n / 1024, "errors": len(errors)}


@dataclass
class ResumeResult:
    viewers: int
    reconnects: int
    latency: dict[str, float]  # reconnect started -> first event received
    service: dict[str, float]  # max(reconnect started, event appended) -> received
    lost: int
    duplicates: int
    incomplete: int
    errors: list[str]
    cpu: dict[str, float]

    def line(self) -> str:
        lat, svc = self.latency, self.service
        return (
            f"{self.viewers} viewers, {self.reconnects} reconnects: reconnect -> first event "
            f"p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms max {lat['max']:.1f} ms; "
            f"service p50 {svc['p50']:.1f} ms p99 {svc['p99']:.1f} ms; gaps {self.lost} "
            f"dup {self.duplicates} incomplete {self.incomplete}; "
            f"CPU server {self.cpu.get('server', 0) * 100:.0f}% "
            f"others {self.cpu.get('others', 0) * 100:.0f}% "
            f"steal {self.cpu.get('steal', 0) * 100:.0f}%"
        )


async def resume(
    stack: Stack, server: Server, viewers: int, every: int, tokens: int, gap_s: float
) -> ResumeResult:
    """``viewers`` viewers that each hang up every ``every`` events and resume after ``gap_s``.

    Hang-ups are staggered (viewer i first leaves after 2 + i % every events), so
    reconnects are spread over the stream instead of arriving all at once.
    """
    gen_id = create_generation(stack.url, tokens)
    host, port = host_port(server.url)
    path = f"/v1/generations/{gen_id}/events"
    latencies: array = array("d")  # type: ignore[type-arg]
    firsts = [
        await open_viewer_pair(host, port, request_bytes("GET", path, f"{host}:{port}"),
                               latencies, 2 + i % every)
        for i in range(viewers)
    ]
    await wait_until(lambda: all(v.ids or v.error for v in firsts), 60,
                     "viewers to receive the queued event")
    raw: list[float] = []
    service: list[float] = []
    errors: list[str] = []
    seen: list[list[int]] = [[] for _ in range(viewers)]
    terminal = [False] * viewers

    async def follow(i: int, first: Viewer) -> None:
        viewer = first
        while True:
            assert viewer.closed is not None
            await viewer.closed
            seen[i].extend(viewer.ids.tolist())
            if viewer.error:
                errors.append(viewer.error)
                return
            if viewer.terminal is not None:
                terminal[i] = True
                return
            if not seen[i]:
                return
            await asyncio.sleep(gap_s)
            last = seen[i][-1]
            headers = {"Last-Event-ID": unpack_id(last)}
            request = request_bytes("GET", path, f"{host}:{port}", headers)
            started = time.time()
            viewer = await open_viewer_pair(host, port, request, latencies, every)
            viewer.sent_at = started
            assert viewer.closed is not None
            await asyncio.wait([viewer.closed], timeout=tokens / 50 * 3 + 30)
            if viewer.ids:
                raw.append((viewer.first_event_at - started) * 1000)
                appended = (viewer.first_event_id >> SEQ_BITS) / 1000
                service.append((viewer.first_event_at - max(started, appended)) * 1000)

    worker = stack.add_worker()
    try:
        pids = {"server": server.pid, "worker": worker.pid}
        cpu = CpuMeter(pids).start()
        await asyncio.wait_for(asyncio.gather(*(follow(i, v) for i, v in enumerate(firsts))),
                               tokens / 50 * 3 + 60)
        cpu_result = cpu.stop()
    finally:
        worker.stop()
        stack.workers.remove(worker)
    canonical = stream_ids(stack.redis_url, gen_id)
    expected = set(canonical)
    lost = sum(len(expected - set(ids)) for ids in seen)
    duplicates = sum(len(ids) - len(set(ids)) for ids in seen)
    return ResumeResult(
        viewers=viewers, reconnects=len(raw), latency=summary(raw), service=summary(service),
        lost=lost, duplicates=duplicates, incomplete=terminal.count(False), errors=errors[:5],
        cpu=cpu_result,
    )


async def open_viewer_pair(host: str, port: int, request: bytes,
                           latencies: array, stop_after: int) -> Viewer:  # type: ignore[type-arg]
    viewer, _ = await open_viewer(host, port, request, latencies, stop_after=stop_after)
    return viewer


def write_calls(pid: int) -> int:
    """Write system calls a process made so far (``syscw`` of /proc/<pid>/io, Linux)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    return 0


@dataclass
class ManyResult:
    streams: int
    latency: dict[str, float]
    duration: dict[str, float]  # running -> terminal per generation, seconds
    ideal_s: float
    lost: int
    duplicates: int
    incomplete: int
    errors: list[str]
    cpu: dict[str, float]
    events_per_s: float
    events: int = 0  # live events delivered to the viewers while measured
    # The API process's CPU (utime + stime, /proc/<pid>/stat via psutil) per event delivered.
    api_us_per_event: float = 0.0
    api_writes: int = 0  # write system calls of the API process (/proc/<pid>/io syscw)
    hub_xreads: int = 0  # XREAD calls (the hub's) while measured

    def line(self) -> str:
        lat, dur = self.latency, self.duration
        return (
            f"{self.events} events delivered, API {self.api_us_per_event:.1f} us CPU per event, "
            f"{self.events / max(1, self.api_writes):.2f} events per write, "
            f"{self.events / max(1, self.hub_xreads):.0f} per XREAD; "
            f"{self.streams} streams: p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms "
            f"max {lat['max']:.1f} ms; {self.events_per_s:.0f} events/s; generation length "
            f"p50 {dur['p50']:.1f} s p99 {dur['p99']:.1f} s (ideal {self.ideal_s:.1f} s); "
            f"lost {self.lost} dup {self.duplicates} incomplete {self.incomplete}; CPU server "
            f"{self.cpu.get('server', 0) * 100:.0f}% worker {self.cpu.get('worker', 0) * 100:.0f}%"
            f" redis {self.cpu.get('redis', 0) * 100:.0f}% client "
            f"{self.cpu.get('client', 0) * 100:.0f}% others {self.cpu.get('others', 0) * 100:.0f}%"
            f" steal {self.cpu.get('steal', 0) * 100:.0f}%"
        )


async def many_streams(stack: Stack, server: Server, streams: int, tokens: int,
                       tps: float) -> ManyResult:
    """``streams`` held generations of ``tokens`` deltas each, one viewer each, one worker."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        async def create_one(_: int) -> str:
            response = await client.post("/v1/generations", json={
                "model": "fake:lorem", "prompt": "bench", "max_tokens": tokens})
            response.raise_for_status()
            gen_id: str = response.json()["id"]
            return gen_id

        gen_ids: list[str] = []
        for start in range(0, streams, 50):
            gen_ids += await asyncio.gather(*(create_one(i) for i in
                                              range(start, min(streams, start + 50))))
    host, port = host_port(server.url)
    latencies: array = array("d")  # type: ignore[type-arg]
    requests = [request_bytes("GET", f"/v1/generations/{g}/events", f"{host}:{port}")
                for g in gen_ids]
    pairs = await open_many(streams, host, port, lambda i: requests[i], latencies)
    viewers = [v for v, _ in pairs]
    await wait_until(lambda: all(v.ids or v.error for v in viewers), 120,
                     "viewers to receive the queued event")
    errors = [v.error for v in viewers if v.error]
    del latencies[:]
    worker = stack.add_worker()
    try:
        await _until_started(viewers[0], 60)
        cpu = CpuMeter({"server": server.pid, "worker": worker.pid,
                        **({"redis": stack.redis.process.pid}
                           if stack.redis and stack.redis.process else {})}).start()
        writes0 = write_calls(server.pid)
        xreads0 = redis_commandstats(stack.redis_url).get("xread", 0)
        closed = [v.closed for v in viewers if v.closed is not None]
        await asyncio.wait(closed, timeout=tokens / tps * 4 + 60)
        cpu_result = cpu.stop()
        writes = write_calls(server.pid) - writes0
        xreads = redis_commandstats(stack.redis_url).get("xread", 0) - xreads0
    finally:
        worker.stop()
        stack.workers.remove(worker)
        for _, proto in pairs:
            proto.close()
    lost = duplicates = incomplete = 0
    durations: list[float] = []
    for viewer, gen_id in zip(viewers, gen_ids, strict=True):
        part = account([viewer], stream_ids(stack.redis_url, gen_id))
        lost, duplicates, incomplete = lost + part[0], duplicates + part[1], incomplete + part[2]
        if len(viewer.ids) >= 3:
            durations.append(((viewer.ids[-1] >> SEQ_BITS) - (viewer.ids[1] >> SEQ_BITS)) / 1000)
    return ManyResult(
        streams=streams, latency=summary(latencies), duration=summary(durations),
        ideal_s=(tokens - 1) / tps, lost=lost, duplicates=duplicates, incomplete=incomplete,
        errors=errors[:5], cpu=cpu_result, events_per_s=len(latencies) / cpu_result["wall_s"],
        events=len(latencies), api_writes=writes, hub_xreads=xreads,
        api_us_per_event=1e6 * cpu_result["server"] * cpu_result["wall_s"] / max(1, len(latencies)),
    )
