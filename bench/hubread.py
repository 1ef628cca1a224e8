"""The hub's read + deliver cost per event: one process's reader over N live streams.

    python bench/hubread.py --streams 1000 --rate 30 --seconds 10 --burst 400
    python bench/hubread.py --against /work/wt/base-hubread/.venv/bin/python --rounds 4

Starts a private redis-server. Each measured run is a child process (this script
with ``--child``) that does what an API process's hub does and nothing else: it
holds one loaded channel per stream (no viewers), starts the real reader
(``api.readers.SingleReader``, lag observed into a Prometheus histogram as the
app does) and adds every channel. Then this process writes the streams as
``--streams`` generations at ``--rate`` events/s each would, the last event of each
a ``done``, in writes of ``--burst`` entries (one Lua call each, one entry per stream
in turn, so the writer costs little): a reader that keeps up reads each write in
one or two XREADs (Redis 6.2 answers a blocked XREAD with the one stream that
woke it), so both sides of a comparison read like batches (in the chat case,
scenario c, the hub's XREADs brought 200-900 events each). The child's CPU
(``time.process_time``) from its channels' addition to the last terminal event,
divided by the events it took in, is the hub's read + deliver cost per event; the
part of it in the garbage collector is timed apart (``gc.callbacks``); Redis's
XREAD calls (INFO commandstats) give the events per read.

``--against PYTHON`` runs the same child with another interpreter, whose
``tokenrelay`` is another checkout (a baseline's venv), alternating with this
one round by round, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis as redis_sync

ROOT = Path(__file__).resolve().parent.parent

# Appends entries s_from .. s_to - 1 of the whole run's sequence: entry s is event
# s // N of stream s % N, so that each stream's events are evenly spaced.
WRITE_TICK = """
local n, last = tonumber(ARGV[3]), tonumber(ARGV[4])
for s = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do
  local k = math.floor(s / n)
  local key = ARGV[5] .. (s % n) .. ARGV[6]
  if k == last then
    redis.call('XADD', key, '*', 't', 'done', 'd', '{"finish_reason":"length"}')
  else
    redis.call('XADD', key, '*', 't', 'delta', 'd', '{"content":"lorem "}')
  end
end
"""


def gen_id(run: str, index: int) -> str:
    return f"{run}{index}"


async def child(args: argparse.Namespace) -> None:
    """One measured run: the reader over ``--streams`` channels; its figures as JSON."""
    from prometheus_client import CollectorRegistry, Histogram
    from redis.asyncio import Redis

    from tokenrelay.api.channel import Channel
    from tokenrelay.api.readers import SingleReader

    lag = Histogram("lag", "", registry=CollectorRegistry(),
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
    redis = Redis.from_url(args.url)
    reader = SingleReader(redis, args.url, lag.observe)
    channels = [Channel(gen_id(args.run, i), 1000) for i in range(args.streams)]
    collecting = [0.0, 0.0]  # CPU seconds in the garbage collector; when the current one began

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting[1] = time.thread_time()
        else:
            collecting[0] += time.thread_time() - collecting[1]

    gc.callbacks.append(on_gc)
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    cpu0 = time.process_time()
    reader.start()
    for channel in channels:
        await reader.add(channel)
    print("ready", flush=True)
    deadline = time.monotonic() + args.seconds * 3 + 30
    while not all(channel.done for channel in channels):
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the streams' terminal events")
        await asyncio.sleep(0.05)
    cpu = time.process_time() - cpu0
    gc.callbacks.remove(on_gc)
    events = sum(len(channel.events) for channel in channels)
    await reader.stop()
    await redis.aclose()
    print(json.dumps({"events": events, "cpu_s": cpu, "gc_s": collecting[0]}), flush=True)


def xread_calls(client: redis_sync.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_xread")
    return int(stats["calls"]) if stats else 0


def run_one(python: str, url: str, run: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start a child with ``python``, write its streams, collect its figures."""
    client = redis_sync.Redis.from_url(url)
    template = "tr:{%s}:events"  # shared.keys.events, checked below
    head, tail = template.split("%s")
    per_stream = max(1, round(args.rate * args.seconds))
    total = per_stream * args.streams
    cmd = [python, str(Path(__file__).resolve()), "--child", "--url", url, "--run", run,
           "--streams", str(args.streams), "--seconds", str(args.seconds),
           "--gc-threshold", str(args.gc_threshold)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"child ({python}) did not start")
    calls0 = xread_calls(client)
    write = client.register_script(WRITE_TICK)
    tick_s = args.burst / (args.streams * args.rate)
    start = next_tick = time.monotonic()
    done = 0
    while done < total:
        due = min(total, done + args.burst)
        write(args=[done, due, args.streams, per_stream - 1, head + run, tail])
        done = due
        next_tick += tick_s
        time.sleep(max(0.0, next_tick - time.monotonic()))
    elapsed = time.monotonic() - start
    out, _ = proc.communicate(timeout=args.seconds * 3 + 60)
    if proc.returncode != 0:
        raise SystemExit(f"child ({python}) failed: {out}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["xreads"] = xread_calls(client) - calls0
    result["expected"] = total
    result["write_s"] = elapsed
    client.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=30.0, help="events/s per stream")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=400,
                        help="entries per write, one per stream in turn (so per XREAD, when "
                             "the reader keeps up)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--against", metavar="PYTHON",
                        help="also run the child with this interpreter (a baseline's venv)")
    parser.add_argument("--gc-threshold", type=int, default=0, metavar="N",
                        help="the children's first garbage collector threshold (default: "
                             "Python's, 700)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--run", default="b", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            import uvloop  # the API runs on uvloop (uvicorn[standard])
            uvloop.install()
        except ImportError:
            pass
        asyncio.run(child(args))
        return

    sys.path.insert(0, str(ROOT))
    from tokenrelay.cli.redis_server import RedisServer
    from tokenrelay.shared import keys
    assert keys.events("%s") == "tr:{%s}:events", "the key template above is out of date"

    variants = [("this", sys.executable)]
    if args.against:
        variants.append(("against", args.against))
    server = RedisServer().start()
    try:
        for rnd in range(args.rounds):
            for label, python in variants if rnd % 2 == 0 else variants[::-1]:
                load = os.getloadavg()[0]
                result = run_one(python, server.url, f"r{rnd}{label[0]}_", args)
                lost = result["expected"] - result["events"]
                print(f"round {rnd + 1} {label:8s} load {load:4.2f}: "
                      f"{result['cpu_s'] / result['events'] * 1e6:5.2f} us CPU per event "
                      f"(GC {result['gc_s'] / result['events'] * 1e6:4.2f}), "
                      f"{result['events'] / max(1, result['xreads']):6.1f} events per XREAD, "
                      f"{result['events']} events (lost {lost}), {result['cpu_s']:.2f} s CPU",
                      flush=True)
                redis_sync.Redis.from_url(server.url).flushall()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
