"""The fan-out scenarios of issue 3, one command each; figures printed and kept as JSON.

    python bench/scenarios.py a   # fan-out: one generation at 50 tokens/s, N = 100, 1,000, 3,000
    python bench/scenarios.py b   # Redis commands for one generation, N = 1 vs N = 1,000
    python bench/scenarios.py c   # 500 generations at 30 tokens/s, one viewer each, one worker
    python bench/scenarios.py d   # memory per idle viewer, N = 5,000
    python bench/scenarios.py e   # resume: 200 viewers each reconnecting every 50 events
    python bench/scenarios.py f   # a, b and d against the naive design in the same run

Every scenario starts its own private redis-server, API process and workers on
loopback (``tests/stack.py``), bounds itself in count and time, and writes
``bench/results/<scenario>.json``; ``bench/plot.py`` draws docs/benchmarks.png.
Options (``--n``, ``--tokens``, ...) shrink or grow a scenario; see ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stack, install_uvloop, machine_note, save, wait_for_quiet  # noqa: E402
from bench.loadrun import (  # noqa: E402
    FanoutResult,
    NaiveServer,
    fanout,
    idle_memory,
    many_streams,
    resume,
    tokenrelay_server,
)

FANOUT_ENV = {"TOKENRELAY_FAKE_TPS": "50", "TOKENRELAY_FAKE_TTFT_MS": "0",
              "TOKENRELAY_MAX_VIEWERS_PER_PROCESS": "50000"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _record(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)


async def scenario_a(args: argparse.Namespace, naive: bool = False) -> dict[str, Any]:
    """Fan-out latency, loss and CPU for one generation at 50 tokens/s."""
    print(f"a. fan-out: one generation, {args.tokens} tokens at 50/s ({machine_note()})")
    stack = Stack(apis=1, workers=0, env=FANOUT_ENV)
    naive_server = NaiveServer(stack.redis_url) if naive else None
    runs: list[FanoutResult] = []
    try:
        servers = [tokenrelay_server(stack)] + ([naive_server.server] if naive_server else [])
        for n in args.n:
            for server in servers:
                result = await fanout(stack, server, n, args.tokens)
                print("  " + result.line(), flush=True)
                runs.append(result)
        if args.stall and not naive:
            for n_stall in (0, args.stall):
                result = await fanout(stack, servers[0], args.stall_n, args.tokens,
                                      stall=n_stall)
                result.extra["stall_pair"] = True
                print("  " + result.line(), flush=True)
                runs.append(result)
    finally:
        if naive_server:
            naive_server.stop()
        stack.stop()
    return {"tokens": args.tokens, "runs": [_record(r) for r in runs]}


def _commands_line(label: str, commands: dict[str, int]) -> str:
    top = sorted(commands.items(), key=lambda kv: -kv[1])[:8]
    return (f"  {label}: {sum(commands.values())} commands ("
            + ", ".join(f"{k} {v}" for k, v in top) + ")")


async def scenario_b(args: argparse.Namespace, naive: bool = False) -> dict[str, Any]:
    """Redis commands (INFO commandstats) for one generation at N = 1 and N = 1,000."""
    print(f"b. Redis work per generation, {args.tokens} tokens ({machine_note()})")
    stack = Stack(apis=1, workers=0, env=FANOUT_ENV)
    naive_server = NaiveServer(stack.redis_url) if naive else None
    out: dict[str, Any] = {"tokens": args.tokens, "runs": []}
    try:
        servers = [tokenrelay_server(stack)] + ([naive_server.server] if naive_server else [])
        for server in servers:
            totals = {}
            for n in args.n:
                result = await fanout(stack, server, n, args.tokens, count_commands=True)
                totals[n] = sum(result.commands.values())
                print(_commands_line(f"{server.name:10s} N={n:5d}", result.commands))
                out["runs"].append(_record(result))
            low, high = min(args.n), max(args.n)
            ratio = totals[high] / totals[low]
            print(f"  {server.name}: N={high} costs {ratio:.2f}x the commands of N={low}")
            out[f"ratio_{server.name}"] = ratio
    finally:
        if naive_server:
            naive_server.stop()
        stack.stop()
    return out


async def scenario_c(args: argparse.Namespace) -> dict[str, Any]:
    """Many streams: one viewer each, one API process, one worker."""
    print(f"c. {args.streams} generations x {args.tokens} tokens at {args.tps:g}/s, "
          f"one viewer each ({machine_note()})")
    stack = Stack(apis=1, workers=0, env={
        **FANOUT_ENV, "TOKENRELAY_FAKE_TPS": str(args.tps),
        "TOKENRELAY_WORKER_CONCURRENCY": str(args.streams + 100),
        "TOKENRELAY_MAX_CONCURRENT_PER_TENANT": str(args.streams + 100),
    })
    try:
        result = await many_streams(stack, tokenrelay_server(stack), args.streams, args.tokens,
                                    args.tps)
    finally:
        stack.stop()
    print("  " + result.line())
    return _record(result)


async def scenario_d(args: argparse.Namespace, naive: bool = False) -> dict[str, Any]:
    """RSS growth per idle viewer at N viewers of one quiet generation."""
    print(f"d. memory per idle viewer, N = {args.n[-1]} ({machine_note()})")
    stack = Stack(apis=1, workers=0, env=FANOUT_ENV)
    naive_server = NaiveServer(stack.redis_url) if naive else None
    out: dict[str, Any] = {"runs": []}
    try:
        servers = [tokenrelay_server(stack)] + ([naive_server.server] if naive_server else [])
        for server in servers:
            result = await idle_memory(stack, server, args.n[-1])
            print(f"  {server.name:10s} N={args.n[-1]}: RSS {result['rss_before_mib']:.0f} -> "
                  f"{result['rss_after_mib']:.0f} MiB, {result['kib_per_viewer']:.1f} KiB "
                  f"per viewer ({result['errors']} errors)")
            out["runs"].append({"server": server.name, **result})
    finally:
        if naive_server:
            naive_server.stop()
        stack.stop()
    return out


async def scenario_e(args: argparse.Namespace) -> dict[str, Any]:
    """Resume: viewers that hang up every ``every`` events and come back with Last-Event-ID."""
    print(f"e. resume: {args.viewers} viewers reconnecting every {args.every} events, "
          f"{args.gap_ms:g} ms away each time, {args.tokens} tokens at 50/s ({machine_note()})")
    stack = Stack(apis=1, workers=0, env=FANOUT_ENV)
    try:
        result = await resume(stack, tokenrelay_server(stack), args.viewers, args.every,
                              args.tokens, args.gap_ms / 1000)
    finally:
        stack.stop()
    print("  " + result.line())
    return _record(result)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "n/a"


async def scenario_f(args: argparse.Namespace) -> dict[str, Any]:
    """a, b and d for tokenrelay and the naive design in one run, as ratios naive / tokenrelay."""
    a = await scenario_a(argparse.Namespace(n=args.n, tokens=args.tokens, stall=0), naive=True)
    b = await scenario_b(argparse.Namespace(n=args.b_n, tokens=args.tokens), naive=True)
    d = await scenario_d(argparse.Namespace(n=[args.d_n]), naive=True)
    print("f. naive / tokenrelay:")
    by = {(r["server"], r["n"]): r for r in a["runs"]}
    for n in args.n:
        ours, theirs = by[("tokenrelay", n)], by[("naive", n)]
        print(f"  a N={n:5d}: p50 {_ratio(theirs['latency']['p50'], ours['latency']['p50'])}, "
              f"p99 {_ratio(theirs['latency']['p99'], ours['latency']['p99'])}, server CPU "
              f"{_ratio(theirs['cpu']['server'], ours['cpu']['server'])}")
    high = max(args.b_n)
    cmds = {r["server"]: sum(r["commands"].values()) for r in b["runs"] if r["n"] == high}
    print(f"  b N={high}: Redis commands {_ratio(cmds['naive'], cmds['tokenrelay'])} "
          f"(growth N=1 -> N={high}: tokenrelay {b['ratio_tokenrelay']:.2f}x, "
          f"naive {b['ratio_naive']:.2f}x)")
    mem = {r["server"]: r["kib_per_viewer"] for r in d["runs"]}
    print(f"  d: memory per idle viewer {_ratio(mem['naive'], mem['tokenrelay'])} "
          f"({mem['tokenrelay']:.1f} vs {mem['naive']:.1f} KiB)")
    return {"a": a, "b": b, "d": d}


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    sub = parser.add_subparsers(dest="scenario", required=True)
    a = sub.add_parser("a", help="fan-out latency")
    a.add_argument("--n", type=_ints, default=[100, 1000, 3000])
    a.add_argument("--tokens", type=int, default=500)
    a.add_argument("--stall", type=int, default=10,
                   help="also run --stall-n viewers with and without this many stalled ones")
    a.add_argument("--stall-n", type=int, default=1000)
    b = sub.add_parser("b", help="Redis commands vs viewers")
    b.add_argument("--n", type=_ints, default=[1, 1000])
    b.add_argument("--tokens", type=int, default=500)
    c = sub.add_parser("c", help="many streams")
    c.add_argument("--streams", type=int, default=500)
    c.add_argument("--tokens", type=int, default=300)
    c.add_argument("--tps", type=float, default=30.0)
    d = sub.add_parser("d", help="memory per idle viewer")
    d.add_argument("--n", type=_ints, default=[5000])
    e = sub.add_parser("e", help="resume")
    e.add_argument("--viewers", type=int, default=200)
    e.add_argument("--every", type=int, default=50)
    e.add_argument("--tokens", type=int, default=1000)
    e.add_argument("--gap-ms", type=float, default=100.0)
    f = sub.add_parser("f", help="a, b, d against the naive design")
    f.add_argument("--n", type=_ints, default=[100, 1000, 3000])
    f.add_argument("--tokens", type=int, default=500)
    f.add_argument("--b-n", type=_ints, default=[1, 1000])
    f.add_argument("--d-n", type=int, default=5000)
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds for the rest of the machine to be idle")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.quiet_wait:
        print(wait_for_quiet(args.quiet_wait), flush=True)
    install_uvloop()
    runner = {"a": scenario_a, "b": scenario_b, "c": scenario_c, "d": scenario_d,
              "e": scenario_e, "f": scenario_f}[args.scenario]
    result = asyncio.run(runner(args))
    path = save(args.scenario, {"args": {k: v for k, v in vars(args).items()}, **result})
    print(f"  (figures kept in {path})")


if __name__ == "__main__":
    main()
