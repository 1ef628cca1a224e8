"""Worker liveness and the reaper that restarts generations whose worker was lost.

arq re-runs the job of a killed worker only when its in-progress key expires
(the job timeout plus 10 s: minutes). Instead each worker process renews a
liveness key every second (TTL ``ALIVE_TTL_S``) and records the generations it
runs in ``keys.RUNNING``. A reaper in every worker process (one pass at a time,
under a short lock) finds entries whose worker key has expired and enqueues the
next attempt, or ends the generation with ``worker_lost`` after the last one.
Fencing in ``shared.streams`` makes a late write by the lost attempt a no-op: its
deltas' ids stay below the expiry of the key (``RedisClock``), and the next attempt's
entries go above it.

Losing Redis must never look like losing a worker: while Redis is down (or paused)
every liveness key can expire, and the first reaper pass after it returns would
otherwise race the owners' renewals. So a missing key only makes its worker a
suspect; the reaper recovers a suspect's generations once it has seen the key
missing for ``SUSPECT_GRACE_S`` of its own observation, time in which a live owner,
renewing every ``RENEW_EVERY_S``, has written it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, lifecycle, queue
from tokenrelay.shared.lifecycle import Lifecycle
from tokenrelay.shared.redis import Script, awaited, text
from tokenrelay.worker.tasks import stop_tasks

logger = logging.getLogger(__name__)

ALIVE_TTL_S = 4
RENEW_EVERY_S = 1.0
REAP_EVERY_S = 1.0
# Longer than two renewals (a live owner reconnects and renews within this), short
# beside the TTL so a real loss is still noticed in seconds.
SUSPECT_GRACE_S = 2 * RENEW_EVERY_S + 0.5
# What a worker keeps back from its liveness key's TTL in the ids of its deltas: covers
# the clocks of a Cluster's nodes disagreeing (the key and a stream on different nodes).
LIMIT_MARGIN_S = 1.0

# KEYS: the liveness key ; ARGV: ttl. Redis's time first: the key expires no earlier
# than that time plus the TTL.
_RENEW = Script("""
local t = redis.call('TIME')
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return t
""")


class RedisClock:
    """Redis's time as this worker reads it, and the end of its lease, for its deltas' ids.

    Each renewal of the liveness key reads Redis's TIME in the same script; between
    renewals the time is carried on by the local monotonic clock (ids never go below
    their stream's last entry, so an estimate behind Redis's own time is safe).
    ``limit_ms`` is the first millisecond this worker's deltas may not use: the key's
    expiry less ``margin_s``. A newer attempt of one of its generations starts only after
    the reaper saw the key missing past its expiry, and writes its entries with ids at
    Redis's time then, above every id this worker may still choose: its late deltas are
    refused (``shared.streams``). Before the first renewal the limit is 0: ids stay
    just above the attempt's ``running`` entry.
    """

    def __init__(self) -> None:
        self._at_ms = 0.0
        self._at_mono = 0.0
        self.limit_ms = 0

    async def renew(self, redis: Redis, key: str, ttl_s: int,
                    margin_s: float = LIMIT_MARGIN_S) -> None:
        """Renew the liveness ``key`` for ``ttl_s`` and read Redis's time with it."""
        seconds, micros = await _RENEW(redis, [key], ttl_s)
        at_ms = int(seconds) * 1000 + int(micros) / 1000
        self._at_ms, self._at_mono = at_ms, time.monotonic()
        self.limit_ms = int(at_ms + (ttl_s - margin_s) * 1000)

    def now_ms(self) -> int:
        """Redis's time, as estimated from the last renewal."""
        return int(self._at_ms + (time.monotonic() - self._at_mono) * 1000)


class Lease:
    def __init__(self, redis: Redis, queue_: queue.Queue, ends: Lifecycle, max_attempts: int,
                 grace_s: float = SUSPECT_GRACE_S):
        # The pid makes logs and `tr:running` readable; the random part keeps ids unique.
        self.worker_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._redis = redis
        self._queue = queue_
        self._ends = ends
        self._max_attempts = max_attempts
        self._tasks: list[asyncio.Task[None]] = []
        self._grace_s = grace_s
        self.clock = RedisClock()
        # worker id -> (first, last) time (monotonic) this process saw its key missing
        self._suspects: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._renew(), name="tr-lease-renew"),
            asyncio.create_task(self._reap_forever(), name="tr-reaper"),
        ]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(keys.worker_alive(self.worker_id))

    async def hold(self, gen_id: str, attempt: int) -> None:
        """Record that this worker runs ``attempt`` of ``gen_id``."""
        await awaited(self._redis.hset(keys.RUNNING, gen_id, f"{self.worker_id} {attempt}"))

    async def release(self, gen_id: str, attempt: int) -> None:
        """Forget the generation, unless a newer attempt (elsewhere) took it over."""
        current = await awaited(self._redis.hget(keys.RUNNING, gen_id))
        if current is not None and text(current) == f"{self.worker_id} {attempt}":
            await awaited(self._redis.hdel(keys.RUNNING, gen_id))

    async def _renew(self) -> None:
        key = keys.worker_alive(self.worker_id)
        while True:
            try:
                await self.clock.renew(self._redis, key, ALIVE_TTL_S)
            except (RedisError, OSError) as exc:
                logger.warning("lease renewal failed: %s", exc)
            await asyncio.sleep(RENEW_EVERY_S)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            try:
                if await self._redis.set(keys.REAPER_LOCK, self.worker_id, nx=True,
                                         px=int(REAP_EVERY_S * 900)):
                    await self.reap_once()
            except (RedisError, OSError) as exc:
                logger.warning("reaper pass failed: %s", exc)

    async def reap_once(self) -> int:
        """One pass: restart or end every generation whose worker is gone; returns how many."""
        running: dict[Any, Any] = await awaited(self._redis.hgetall(keys.RUNNING))
        if not running:
            return 0
        entries = [(text(g), *text(v).split()) for g, v in running.items()]
        workers = sorted({worker_id for _, worker_id, _ in entries})  # one check per worker
        async with self._redis.pipeline(transaction=False) as pipe:
            for worker_id in workers:
                pipe.exists(keys.worker_alive(worker_id))
            alive = await pipe.execute()
        lost_workers = self._confirmed({
            worker_id for worker_id, is_alive in zip(workers, alive, strict=True)
            if not is_alive})
        lost = 0
        for gen_id, worker_id, attempt_s in entries:
            if worker_id in lost_workers:
                lost += await self._recover(gen_id, worker_id, int(attempt_s))
        return lost

    def _confirmed(self, missing: set[str]) -> set[str]:
        """Of the workers whose key is missing now, those missing for the whole grace.

        An observation continues a suspicion only if the previous one was recent; a
        worker seen alive (or not seen for a while) starts over.
        """
        now = time.monotonic()
        window = self._grace_s + 2 * REAP_EVERY_S
        suspects = {}
        for worker_id in missing:
            first, last = self._suspects.get(worker_id, (now, now))
            suspects[worker_id] = (first if now - last <= window else now, now)
        self._suspects = suspects
        return {w for w, (first, _) in suspects.items() if now - first >= self._grace_s}

    async def _recover(self, gen_id: str, worker_id: str, attempt: int) -> int:
        meta = await awaited(self._redis.hmget(keys.meta(gen_id), ["status", "attempt"]))
        status = text(meta[0]) if meta[0] else None
        if status is None or status in ev.TERMINAL_STATUSES or text(meta[1]) != str(attempt):
            # Ended, expired, or already taken over: only the bookkeeping is stale.
            await awaited(self._redis.hdel(keys.RUNNING, gen_id))
            await queue.drop(self._queue, gen_id, attempt)
            return 0
        if attempt >= self._max_attempts:
            logger.error("worker lost %d times, giving up generation_id=%s", attempt, gen_id)
            await self._ends.end(gen_id, attempt, lifecycle.failed(
                "worker_lost", f"the worker was lost {attempt} times", retryable=True))
            await awaited(self._redis.hdel(keys.RUNNING, gen_id))
        else:
            logger.warning("worker %s lost; restarting generation_id=%s attempt=%d",
                           worker_id, gen_id, attempt + 1)
            await queue.enqueue_attempt(self._queue, gen_id, attempt + 1)
        # The lost attempt's job would count against the queue's limit until its claim expired.
        await queue.drop(self._queue, gen_id, attempt)
        return 1
