"""Worker liveness and the reaper that restarts generations whose worker was lost.

arq re-runs the job of a killed worker only when its in-progress key expires
(the job timeout plus 10 s: minutes). Instead each worker process renews a
liveness key every second (TTL ``ALIVE_TTL_S``) and records the generations it
runs in ``keys.RUNNING``. A reaper in every worker process (one pass at a time,
under a short lock) finds entries whose worker key has expired and enqueues the
next attempt, or ends the generation with ``worker_lost`` after the last one.
Fencing in ``shared.streams`` makes a late write by the lost attempt a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, limits, streams, threads
from tokenrelay.shared.redis import awaited
from tokenrelay.shared.usage import record as count_usage
from tokenrelay.worker.tasks import stop_tasks

logger = logging.getLogger(__name__)

ALIVE_TTL_S = 4
RENEW_EVERY_S = 1.0
REAP_EVERY_S = 1.0
JOB_NAME = "generate"


def job_id(gen_id: str, attempt: int) -> str:
    """arq job id of an attempt: the first is the generation id, later ones are suffixed."""
    return gen_id if attempt == 1 else f"{gen_id}:a{attempt}"


async def enqueue_attempt(queue: ArqRedis, redis: Redis, gen_id: str, attempt: int) -> None:
    """Queue ``attempt`` of a generation and wake the workers."""
    await queue.enqueue_job(JOB_NAME, gen_id, attempt, _job_id=job_id(gen_id, attempt))
    await queue.publish(keys.WAKE_CHANNEL, gen_id)  # workers listen on the queue's Redis


class Lease:
    def __init__(self, redis: Redis, queue: ArqRedis, max_attempts: int, retention_s: int):
        # The pid makes logs and `tr:running` readable; the random part keeps ids unique.
        self.worker_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._redis = redis
        self._queue = queue
        self._max_attempts = max_attempts
        self._retention_s = retention_s
        self._tasks: list[asyncio.Task[None]] = []
        self.reaped = 0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._renew(), name="tr-lease-renew"),
            asyncio.create_task(self._reap_forever(), name="tr-reaper"),
        ]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(keys.worker_alive(self.worker_id))

    async def _start_job(self, gen_id: str) -> None:
        """Start a thread's next generation (its first attempt)."""
        await enqueue_attempt(self._queue, self._redis, gen_id, 1)

    async def hold(self, gen_id: str, attempt: int) -> None:
        """Record that this worker runs ``attempt`` of ``gen_id``."""
        await awaited(self._redis.hset(keys.RUNNING, gen_id, f"{self.worker_id} {attempt}"))

    async def release(self, gen_id: str, attempt: int) -> None:
        """Forget the generation, unless a newer attempt (elsewhere) took it over."""
        current = await awaited(self._redis.hget(keys.RUNNING, gen_id))
        if current is not None and _text(current) == f"{self.worker_id} {attempt}":
            await awaited(self._redis.hdel(keys.RUNNING, gen_id))

    async def _renew(self) -> None:
        key = keys.worker_alive(self.worker_id)
        while True:
            try:
                await self._redis.set(key, "1", ex=ALIVE_TTL_S)
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
        entries = [(_text(g), *_text(v).split()) for g, v in running.items()]
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, worker_id, _ in entries:
                pipe.exists(keys.worker_alive(worker_id))
            alive = await pipe.execute()
        lost = 0
        for (gen_id, worker_id, attempt_s), is_alive in zip(entries, alive, strict=True):
            if not is_alive:
                lost += await self._recover(gen_id, worker_id, int(attempt_s))
        return lost

    async def _recover(self, gen_id: str, worker_id: str, attempt: int) -> int:
        meta = await awaited(self._redis.hmget(keys.meta(gen_id), ["status", "attempt"]))
        status, current = _text(meta[0]) if meta[0] else None, meta[1]
        if status is None or status in ev.TERMINAL_STATUSES or _text(current) != str(attempt):
            # Ended, expired, or already taken over: only the bookkeeping is stale.
            await awaited(self._redis.hdel(keys.RUNNING, gen_id))
            return 0
        if attempt >= self._max_attempts:
            logger.error("worker lost %d times, giving up generation_id=%s", attempt, gen_id)
            data = {"code": "worker_lost", "retryable": True,
                    "message": f"the worker was lost {attempt} times"}
            if await streams.finish(self._redis, gen_id, attempt, ev.ERROR, data,
                                    self._retention_s, {"error": ev.dumps(data)}):
                await count_usage(self._redis, gen_id, self._retention_s)
                await limits.release_generation(self._redis, gen_id)
                await threads.on_generation_end(self._redis, gen_id, self._start_job)
            await awaited(self._redis.hdel(keys.RUNNING, gen_id))
        else:
            logger.warning("worker %s lost; restarting generation_id=%s attempt=%d",
                           worker_id, gen_id, attempt + 1)
            await enqueue_attempt(self._queue, self._redis, gen_id, attempt + 1)
        self.reaped += 1
        return 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
