"""Chaos run: the compose topology as plain processes, under faults, checked event by event.

3 API processes, 3 workers and a Redis with AOF on loopback. Generations are created at
a steady pace, each watched by several viewers that drop and resume (``Last-Event-ID``)
at random on random API processes. During the run one API process and one worker are
killed with SIGKILL (and started again, as compose's restart policy would) and Redis is
restarted once. Afterwards every viewer's events are compared with the stream in Redis:

    python bench/chaos.py                     # the full run: 200 generations x 10 viewers
    python bench/chaos.py --generations 12    # a small one (tests/test_chaos.py runs one)

It prints the figures (terminal generations, lost / duplicated / reordered events, text
equality) and the recovery time after each fault, and can write them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaos_report import Report, add_recovery, p50  # noqa: E402
from tests.client import text_of  # noqa: E402
from tests.stack import Stack  # noqa: E402
from tokenrelay.cli.redis_server import RedisServer  # noqa: E402
from tokenrelay.shared import keys  # noqa: E402
from tokenrelay.shared.events import Event, parse_id  # noqa: E402

START_TIMEOUT_S = 120.0


@dataclass
class Config:
    generations: int = 200
    viewers: int = 10  # per generation
    tokens: int = 60  # words per generation (fake:lorem)
    tps: float = 10.0  # words per second of the fake provider
    create_over_s: float = 40.0  # creations are spread evenly over this long
    drop_per_event: float = 0.02  # chance that a viewer drops after any event
    redis_down_s: float = 1.0  # how long Redis stays down when it is restarted
    deadline_s: float = 240.0  # the whole run gives up after this long
    seed: int = 7


@dataclass
class ViewerLog:
    gen: int
    events: list[Event] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    url: str | None = None  # the API process it is connected to right now
    drops: int = 0  # drops it chose
    failures: int = 0  # connections that failed or were refused (fault, 503)


class Chaos:
    def __init__(self, config: Config):
        self.config = config
        self.rng = random.Random(config.seed)
        self.server = RedisServer(appendonly=True)
        self.stack: Stack | None = None
        self.urls: list[str] = []
        self.gen_ids: list[str | None] = [None] * config.generations
        self.logs: list[ViewerLog] = []
        self.creates_refused = 0
        self.faults: dict[str, dict[str, Any]] = {}
        self.t0 = 0.0
        self.connect_s: list[float] = []

    # --- the run -----------------------------------------------------------------------

    def run(self) -> Report:
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        self.server.start()
        try:
            self.stack = Stack(apis=0, workers=0, redis_url=self.server.url, env={
                "TOKENRELAY_FAKE_TPS": str(self.config.tps),
                "TOKENRELAY_FAKE_TTFT_MS": "100",
                "TOKENRELAY_MAX_CONCURRENT_PER_TENANT": "100000",
            })
            for _ in range(3):
                self.stack.add_api()
                self.stack.add_worker()
            self.urls = list(self.stack.urls)
            for url in self.urls:  # six interpreters starting on a shared machine: be patient
                self.stack.wait_ready(url, START_TIMEOUT_S)
            asyncio.run(self._main())
            report = self._check()
        finally:
            if self.stack is not None:
                self.stack.stop()
            self.server.stop()
        report.wall_s = time.monotonic() - started
        report.load_avg = [load_before, os.getloadavg()[0]]
        connects = sorted(self.connect_s)
        if connects:
            report.connect_p50_s = connects[len(connects) // 2]
            report.connect_p99_s = connects[min(len(connects) - 1, int(len(connects) * 0.99))]
        return report

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
        timeout = httpx.Timeout(5.0, read=30.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            self.t0 = time.time()
            tasks = [asyncio.create_task(self._generation(client, i))
                     for i in range(self.config.generations)]
            faults = asyncio.create_task(self._faults())
            try:
                await asyncio.wait_for(asyncio.gather(*tasks, faults), self.config.deadline_s)
            except TimeoutError:
                raise TimeoutError(self._stuck(faults)) from None

    def _stuck(self, faults: asyncio.Task[None]) -> str:
        """What had not finished at the deadline, for the error message."""
        created = [g for g in self.gen_ids if g is not None]
        open_logs = [log for log in self.logs if not _ended(log)]
        stuck = sorted({self.gen_ids[log.gen] or "?" for log in open_logs})
        client = redis_sync.Redis.from_url(self.server.url)
        try:
            states = {g: client.hget(keys.meta(g), "status") for g in stuck[:10]}
        finally:
            client.close()
        return (f"chaos run past its {self.config.deadline_s:g} s deadline: "
                f"{len(created)}/{self.config.generations} generations created, "
                f"{len(open_logs)} viewers without their terminal event on {len(stuck)} "
                f"generations (status of the first: {states}); faults done: "
                f"{sorted(self.faults)}{'' if faults.done() else ' (still running)'}")

    async def _generation(self, client: httpx.AsyncClient, i: int) -> None:
        spacing = self.config.create_over_s / max(1, self.config.generations)
        await asyncio.sleep(i * spacing)
        gen_id = await self._create(client, i)
        self.gen_ids[i] = gen_id
        logs = [ViewerLog(i) for _ in range(self.config.viewers)]
        self.logs += logs
        await asyncio.gather(*(self._view(client, gen_id, log) for log in logs))

    async def _create(self, client: httpx.AsyncClient, i: int) -> str:
        body = {"model": "fake:lorem", "prompt": f"chaos {i}", "max_tokens": self.config.tokens}
        # The same key on every retry: a create whose answer was lost is not doubled.
        headers = {"Idempotency-Key": f"chaos-{self.config.seed}-{i}"}
        while True:
            url = self.rng.choice(self.urls)
            wait = 0.1
            try:
                response = await client.post(f"{url}/v1/generations", json=body, headers=headers)
                if response.status_code == 202:
                    gen_id: str = response.json()["id"]
                    return gen_id
                if response.status_code not in (429, 503):
                    raise RuntimeError(f"create answered {response.status_code}: {response.text}")
                wait = min(float(response.headers.get("retry-after", "1")), 2.0)
            except httpx.TransportError:
                pass
            self.creates_refused += 1
            await asyncio.sleep(wait)

    async def _view(self, client: httpx.AsyncClient, gen_id: str, log: ViewerLog) -> None:
        """Follow to the terminal event, dropping at random and resuming on a random process."""
        rng = random.Random(self.rng.random())
        await asyncio.sleep(rng.uniform(0, 1.0))  # viewers join over the first second
        while True:
            url = rng.choice(self.urls)
            headers = {"Last-Event-ID": log.events[-1].id} if log.events else {}
            began = time.time()
            try:
                async with aconnect_sse(client, "GET", f"{url}/v1/generations/{gen_id}/events",
                                        headers=headers) as source:
                    self.connect_s.append(time.time() - began)
                    if source.response.status_code != 200:
                        log.failures += 1
                        await asyncio.sleep(0.1)
                        continue
                    log.url = url
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue
                        event = Event(sse.id, sse.event, json.loads(sse.data))
                        log.events.append(event)
                        log.arrivals.append(time.time())
                        if event.terminal:
                            log.url = None
                            return
                        if rng.random() < self.config.drop_per_event:
                            log.drops += 1
                            break
            except httpx.HTTPError:
                log.failures += 1
            log.url = None
            await asyncio.sleep(rng.uniform(0.0, 0.2))

    # --- faults --------------------------------------------------------------------------

    async def _at(self, fraction: float) -> None:
        delay = self.t0 + fraction * self.config.create_over_s - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _faults(self) -> None:
        await self._at(0.25)
        # The killed API's comeback is awaited beside the next faults: a replacement slow
        # to start (seen: 12-24 s on a busy machine) must not push the worker kill past
        # the end of every generation, leaving it nothing to kill.
        api_kill = asyncio.create_task(self._kill_api())
        try:
            await self._at(0.45)
            await self._kill_worker()
            await self._at(0.65)
            await self._restart_redis()
            await api_kill
        finally:
            api_kill.cancel()

    async def _kill_api(self) -> None:
        assert self.stack is not None
        # The process serving the most viewers right now, so the fault hits as many as it can.
        index = max(range(len(self.urls)),
                    key=lambda i: sum(log.url == self.urls[i] for log in self.logs))
        proc, port, url = self.stack.apis[index], self.stack.ports[index], self.urls[index]
        on_it = [log for log in self.logs if log.url == url]
        at = time.time()
        await asyncio.to_thread(proc.kill)
        # compose's `restart: unless-stopped`: the same service comes back on its port.
        replacement = await asyncio.to_thread(self.stack.add_api, port)
        self.stack.apis[index] = replacement
        del self.stack.apis[-1], self.stack.ports[-1]
        await asyncio.to_thread(self.stack.wait_ready, url, START_TIMEOUT_S)
        ready_s = time.time() - at
        await self._until(lambda: all(_next_after(log, at) is not None or _ended(log)
                                      for log in on_it))
        gaps = [g for log in on_it if (g := _next_after(log, at)) is not None]
        self.faults["api_kill"] = {"at_s": at - self.t0, "viewers": len(on_it),
                                   "p50_s": p50(gaps), "max_s": max(gaps, default=0.0),
                                   "ready_s": ready_s}

    async def _kill_worker(self) -> None:
        assert self.stack is not None
        client = redis_sync.Redis.from_url(self.server.url)
        try:
            running: dict[bytes, bytes] = {}

            def some_running() -> bool:
                running.clear()
                running.update(client.hgetall(keys.RUNNING))
                return bool(running)

            await self._until(some_running)
            by_pid: dict[int, list[str]] = {}
            for gen, value in running.items():
                pid = int(value.decode().split("-")[0])
                by_pid.setdefault(pid, []).append(gen.decode())
            pid, gens = max(by_pid.items(), key=lambda item: len(item[1]))
            index = next(i for i, w in enumerate(self.stack.workers) if w.pid == pid)
            at = time.time()
            await asyncio.to_thread(self.stack.workers[index].kill)
            self.stack.workers[index] = await asyncio.to_thread(self.stack.add_worker)
            del self.stack.workers[-1]
        finally:
            client.close()
        self.faults["worker_kill"] = {"at_s": at - self.t0, "generations": len(gens),
                                      "victims": gens, "killed_at": at}

    async def _restart_redis(self) -> None:
        at = time.time()
        # The generations workers are running now (a lagging viewer's view would be stale).
        client = redis_sync.Redis.from_url(self.server.url)
        try:
            running = [g.decode() for g in client.hkeys(keys.RUNNING)]
        finally:
            client.close()
        await asyncio.to_thread(self.server._terminate)
        await asyncio.sleep(self.config.redis_down_s)  # the outage itself
        await asyncio.to_thread(self.server.start)
        up = time.time()
        assert self.stack is not None
        for url in self.urls:
            await asyncio.to_thread(self.stack.wait_ready, url, 30.0)
        self.faults["redis_restart"] = {"at_s": at - self.t0, "down_s": up - at,
                                        "ready_s": time.time() - up, "running": running,
                                        "up_at": up}

    async def _until(self, predicate: Any, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("chaos: a fault's precondition or recovery never came")
            await asyncio.sleep(0.05)

    # --- the verdict ---------------------------------------------------------------------

    def _check(self) -> Report:
        assert self.stack is not None
        report = Report(config=asdict(self.config), generations=self.config.generations,
                        creates_refused=self.creates_refused)
        client = redis_sync.Redis.from_url(self.server.url)
        streams: dict[str, list[Event]] = {}
        contents: dict[str, str] = {}
        try:
            for gen_id in self.gen_ids:
                assert gen_id is not None
                entries = client.xrange(keys.events(gen_id))
                streams[gen_id] = [Event(i.decode(), f[b"t"].decode(), json.loads(f[b"d"]))
                                   for i, f in entries]
                status = httpx.get(f"{self.urls[0]}/v1/generations/{gen_id}", timeout=10).json()
                contents[gen_id] = status["content"]
                if status["status"] in ("completed", "failed", "cancelled"):
                    kind = streams[gen_id][-1].type
                    report.terminal[kind] = report.terminal.get(kind, 0) + 1
                if any(e.data.get("status") == "restarted" for e in streams[gen_id]):
                    report.restarted_generations += 1
        finally:
            client.close()
        ages: list[float] = []
        for log in self.logs:
            gen_id = self.gen_ids[log.gen]
            assert gen_id is not None
            ages += [t - parse_id(e.id)[0] / 1000 for e, t in zip(log.events, log.arrivals,
                                                                  strict=True)]
            canonical = [e.id for e in streams[gen_id]]
            got = [e.id for e in log.events]
            report.viewers += 1
            report.events_delivered += len(got)
            report.lost += len(set(canonical) - set(got))
            report.duplicated += len(got) - len(set(got))
            received = set(got)
            report.reordered_viewers += list(dict.fromkeys(got)) != [
                i for i in canonical if i in received]
            report.incomplete_viewers += not (log.events and log.events[-1].terminal)
            report.viewers_text_equal += text_of(log.events) == contents[gen_id]
            report.drops += log.drops
            report.failed_connections += log.failures
        ages.sort()
        if ages:
            report.age_p50_s = ages[len(ages) // 2]
            report.age_p99_s = ages[min(len(ages) - 1, int(len(ages) * 0.99))]
        add_recovery(report, self.faults, streams)
        return report

def _next_after(log: ViewerLog, at: float) -> float | None:
    """Seconds from ``at`` to this viewer's first event after it, if any yet."""
    for arrival in log.arrivals:
        if arrival > at:
            return arrival - at
    return None


def _ended(log: ViewerLog) -> bool:
    return bool(log.events) and log.events[-1].terminal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    config = Config(**{k: getattr(args, k) for k in asdict(defaults)})
    report = Chaos(config).run()
    print("\n".join(report.lines()))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
