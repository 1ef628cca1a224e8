"""Building blocks of the load scenarios: a held generation, N viewers, and their accounting.

A "held" generation is created while no worker runs, so its stream holds only
``status: queued``; viewers connect and receive that event, and only then is a
worker started. Every later event is live for every viewer, as in the reference
figures (all viewers connected before the first event).
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis as redis_sync

from bench.common import CpuMeter, Stack, host_port, stack_pids, summary, wait_until
from bench.sseclient import SSEProtocol, Viewer, open_many, pack_id, request_bytes
from shared import keys


@dataclass
class FanoutResult:
    n: int
    events: int  # events in the stream (canonical)
    latency: dict[str, float]
    lost: int  # events missing, summed over viewers
    duplicates: int  # events received twice or more, summed over viewers
    incomplete: int  # viewers that did not get the terminal event
    errors: list[str]
    cpu: dict[str, float]
    connect_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        lat = self.latency
        cpu = self.cpu
        return (
            f"N={self.n:5d}  p50 {lat['p50']:7.1f} ms  p99 {lat['p99']:7.1f} ms  "
            f"max {lat['max']:7.1f} ms  lost {self.lost}  dup {self.duplicates}  "
            f"incomplete {self.incomplete}  CPU api {cpu.get('api', 0) * 100:.0f}% "
            f"worker {cpu.get('worker', 0) * 100:.0f}% redis {cpu.get('redis', 0) * 100:.0f}% "
            f"client {cpu.get('client', 0) * 100:.0f}%"
        )


def create_generation(base_url: str, max_tokens: int, model: str = "fake:lorem") -> str:
    response = httpx.post(
        f"{base_url}/v1/generations",
        json={"model": model, "prompt": "bench", "max_tokens": max_tokens},
        timeout=10,
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


def status_of(redis_url: str, gen_id: str) -> str:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        raw = client.hget(keys.meta(gen_id), "status")
        return raw.decode() if raw else ""
    finally:
        client.close()


def account(
    viewers: list[Viewer], canonical: list[int], skip_first: int = 0
) -> tuple[int, int, int]:
    """(lost, duplicates, incomplete) summed over viewers, against the stream in Redis."""
    expected = set(canonical[skip_first:])
    lost = duplicates = incomplete = 0
    for viewer in viewers:
        got = viewer.ids.tolist()
        seen = set(got)
        duplicates += len(got) - len(seen)
        lost += len(expected - seen)
        if viewer.terminal is None:
            incomplete += 1
    return lost, duplicates, incomplete


async def fanout(
    stack: Stack,
    viewer_url: str,
    n: int,
    tokens: int,
    api_pid: int,
    stall: int = 0,
    deadline_s: float | None = None,
) -> FanoutResult:
    """One held generation of ``tokens`` deltas watched by ``n`` viewers on ``viewer_url``.

    ``stall`` more connections open the stream and then stop reading (their
    socket buffers fill, the server must not wait for them).
    """
    gen_id = create_generation(stack.url, tokens)
    host, port = host_port(viewer_url)
    path = f"/v1/generations/{gen_id}/events"
    request = request_bytes("GET", path, f"{host}:{port}")
    latencies: array = array("d")  # type: ignore[type-arg]
    t0 = time.monotonic()
    pairs = await open_many(n, host, port, lambda i: request, latencies)
    stalled: list[tuple[Viewer, SSEProtocol]] = []
    if stall:
        stalled = await open_many(stall, host, port, lambda i: request, array("d"))
    viewers = [v for v, _ in pairs]
    everyone = viewers + [v for v, _ in stalled]
    await wait_until(lambda: all(v.ids or v.error for v in everyone), 120,
                     f"{n} viewers to receive the queued event")
    for _, proto in stalled:
        assert proto.transport is not None
        proto.transport.pause_reading()  # a viewer that stops reading
    connect_s = time.monotonic() - t0
    errors = [v.error for v in everyone if v.error]
    del latencies[:]  # the queued event was a replay; measure live events only

    worker = stack.add_worker()
    try:
        await wait_until(lambda: status_of(stack.redis_url, gen_id) != "queued", 60,
                         "the worker to start the generation", interval=0.01)
        pids = {"api": api_pid, "worker": worker.pid}
        pids.update({k: v for k, v in stack_pids(stack).items() if k == "redis"})
        cpu = CpuMeter(pids).start()
        budget = deadline_s if deadline_s is not None else tokens / 50 * 3 + 30
        closed = [v.closed for v in viewers if v.closed is not None]
        await asyncio.wait(closed, timeout=budget)
        cpu_result = cpu.stop()
    finally:
        worker.stop()
        stack.workers.remove(worker)
        for _, proto in [*pairs, *stalled]:
            proto.close()
    canonical = stream_ids(stack.redis_url, gen_id)
    lost, duplicates, incomplete = account(viewers, canonical)
    return FanoutResult(
        n=n,
        events=len(canonical),
        latency=summary(latencies),
        lost=lost,
        duplicates=duplicates,
        incomplete=incomplete,
        errors=errors[:5],
        cpu=cpu_result,
        connect_s=connect_s,
        extra={"gen_id": gen_id, "stalled_viewers": stall},
    )


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


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=float)
