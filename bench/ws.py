"""WebSocket viewers beside SSE viewers (issue 14): Redis commands and delivery latency.

    python bench/ws.py                # N = 1 and N = 1,000 of each, one generation each run
    python bench/ws.py --n 1,3000 --tokens 300
    python bench/ws.py --idle 5000    # also: memory per idle viewer of each, N = 5,000

One API process, one Redis, a worker started once the viewers are in (the held
generation of bench/loadrun.py), ``fake:lorem`` at 50 tokens/s. For each protocol and N,
one generation watched by N viewers: the Redis commands of the run (``INFO
commandstats``, reset before the viewers connect) and every event's delivery latency
(client clock minus the event id's milliseconds). The WebSocket viewers are
bench/wsclient.py, the SSE ones bench/sseclient.py: equally cheap clients. Figures go to
bench/results/ws.json (and history.jsonl), with the machine's ``uptime``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import wsclient  # noqa: E402
from bench.common import Stack, install_uvloop, machine_note, save, wait_for_quiet  # noqa: E402
from bench.loadrun import FanoutResult, fanout, idle_memory, tokenrelay_server  # noqa: E402
from bench.scenarios import FANOUT_ENV  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def run(ns: list[int], tokens: int, idle: int) -> dict[str, Any]:
    print(f"WebSocket vs SSE: one generation, {tokens} tokens at 50/s ({machine_note()})")
    print(f"  before: {uptime()}", flush=True)
    stack = Stack(apis=1, workers=0, env=FANOUT_ENV)
    runs: list[FanoutResult] = []
    try:
        server = tokenrelay_server(stack)
        for n in ns:
            for protocol, opener in (("sse", None), ("websocket", wsclient.open_many)):
                result = await fanout(stack, server, n, tokens, count_commands=True,
                                      opener=opener)
                result = dataclasses.replace(result, server=protocol)
                total = sum(result.commands.values())
                print(f"  {result.line()}  redis {total} commands", flush=True)
                runs.append(result)
    finally:
        stack.stop()
    memory = {}
    for protocol, opener in (("sse", None), ("websocket", wsclient.open_many)):
        if not idle:
            break
        fresh = Stack(apis=1, workers=0, env=FANOUT_ENV)  # RSS freed by others is reused
        try:
            memory[protocol] = found = await idle_memory(fresh, tokenrelay_server(fresh), idle,
                                                         opener)
        finally:
            fresh.stop()
        print(f"  {protocol:10s} N={idle}: RSS {found['rss_before_mib']:.0f} -> "
              f"{found['rss_after_mib']:.0f} MiB, {found['kib_per_viewer']:.1f} KiB "
              f"per idle viewer ({found['errors']} errors)", flush=True)
    after = uptime()
    print(f"  after: {after}")
    out: dict[str, Any] = {"tokens": tokens, "uptime_after": after, "memory": memory,
                           "runs": [dataclasses.asdict(r) for r in runs]}
    low, high = min(ns), max(ns)
    for protocol in ("sse", "websocket"):
        by_n = {r.n: r for r in runs if r.server == protocol}
        ratio = sum(by_n[high].commands.values()) / sum(by_n[low].commands.values())
        out[f"commands_ratio_{protocol}"] = ratio
        print(f"  {protocol}: N={high} costs {ratio:.2f}x the Redis commands of N={low}; "
              f"at N={high} p50 {by_n[high].latency['p50']:.1f} ms, "
              f"p99 {by_n[high].latency['p99']:.1f} ms")
    return out


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--n", type=lambda t: [int(x) for x in t.split(",") if x],
                        default=[1, 1000], help="viewer counts, comma separated")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--idle", type=int, default=0, metavar="N",
                        help="also measure the memory of N idle viewers of each protocol")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds for the rest of the machine to be idle")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.quiet_wait:
        print(wait_for_quiet(args.quiet_wait), flush=True)
    install_uvloop()
    result = asyncio.run(run(args.n, args.tokens, args.idle))
    path = save("ws", {"args": vars(args), **result})
    print(f"  (figures kept in {path})")


if __name__ == "__main__":
    main()
