"""Capacity figures for docs/scaling.md: CPU per token and per delivered event, Redis
commands per token, measured on one API process, one worker and a private Redis.

    python bench/capacity.py                          # 40 generations x 10 viewers
    python bench/capacity.py --generations 80 --viewers 5 --json out.json

Every generation (``fake:lorem``, ``--tokens`` words at ``--tps``) is created while no
viewer waits, then all viewers attach at once and read to the end. The figures are
deltas of the processes' CPU times (psutil) and of Redis ``INFO commandstats`` over
the run, divided by the tokens written and the events delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis as redis_sync
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.stack import Stack  # noqa: E402


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _commands(client: redis_sync.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _watch(client: httpx.AsyncClient, url: str, gen_id: str) -> int:
    events = 0
    async with aconnect_sse(client, "GET", f"{url}/v1/generations/{gen_id}/events") as source:
        async for sse in source.aiter_sse():
            if sse.data:
                events += 1
                if sse.event in ("done", "error", "cancelled"):
                    break
    return events


async def _run(url: str, generations: int, viewers: int, tokens: int) -> tuple[list[str], int]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0, read=60.0)) as client:
        gen_ids = []
        for _ in range(generations):
            response = await client.post(f"{url}/v1/generations", json={
                "model": "fake:lorem", "prompt": "x", "max_tokens": tokens})
            response.raise_for_status()
            gen_ids.append(response.json()["id"])
        counts = await asyncio.gather(*(_watch(client, url, g) for g in gen_ids
                                        for _ in range(viewers)))
    return gen_ids, sum(counts)


def measure(generations: int, viewers: int, tokens: int, tps: float) -> dict[str, Any]:
    stack = Stack(apis=0, workers=0, env={"TOKENRELAY_FAKE_TPS": str(tps),
                                          "TOKENRELAY_MAX_CONCURRENT_PER_TENANT": "100000"})
    try:
        api, worker = stack.add_api(), stack.add_worker()
        stack.wait_ready(stack.url, 120.0)
        assert stack.redis is not None
        procs = {"api": psutil.Process(api.pid), "worker": psutil.Process(worker.pid),
                 "redis": psutil.Process(stack.redis.process.pid)}  # type: ignore[union-attr]
        client = redis_sync.Redis.from_url(stack.redis_url)
        cpu0 = {name: _cpu(p) for name, p in procs.items()}
        cmd0 = _commands(client)
        started = time.monotonic()
        _gen_ids, delivered = asyncio.run(_run(stack.url, generations, viewers, tokens))
        wall = time.monotonic() - started
        cpu = {name: _cpu(p) - cpu0[name] for name, p in procs.items()}
        cmd1 = _commands(client)
        client.close()
    finally:
        stack.stop()
    calls = {k: v - cmd0.get(k, 0) for k, v in cmd1.items() if v - cmd0.get(k, 0) > 0}
    written = generations * tokens
    return {
        "generations": generations, "viewers_per_generation": viewers, "tokens": tokens,
        "tps": tps, "wall_s": wall, "tokens_written": written, "events_delivered": delivered,
        "cpu_s": cpu, "commands": calls,
        "worker_cpu_ms_per_token": 1000 * cpu["worker"] / written,
        "api_cpu_us_per_event": 1e6 * cpu["api"] / delivered,
        "redis_cpu_us_per_token": 1e6 * cpu["redis"] / written,
        "redis_commands_per_token": sum(calls.values()) / written,
        "load_avg": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=40)
    parser.add_argument("--viewers", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--tps", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.generations, args.viewers, args.tokens, args.tps)
    r = result
    print(f"{r['generations']} generations x {r['viewers_per_generation']} viewers, "
          f"{r['tokens']} words at {r['tps']:g}/s: {r['tokens_written']} tokens written, "
          f"{r['events_delivered']} events delivered in {r['wall_s']:.1f} s "
          f"(load average {r['load_avg']:.1f})")
    print(f"worker: {r['worker_cpu_ms_per_token']:.3f} ms CPU per token; "
          f"API: {r['api_cpu_us_per_event']:.1f} us CPU per delivered event; "
          f"Redis: {r['redis_cpu_us_per_token']:.1f} us CPU and "
          f"{r['redis_commands_per_token']:.2f} commands per token")
    top = sorted(r["commands"].items(), key=lambda kv: -kv[1])[:8]
    print("commands: " + ", ".join(f"{k} {v}" for k, v in top))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
