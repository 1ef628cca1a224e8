"""The arq worker of tokenrelay: settings, start-up, and a poll loop woken by pub/sub.

arq polls its queue every ``poll_delay`` (0.5 s by default), which would add up
to half a second before the first token. The API publishes on
``keys.WAKE_CHANNEL`` after every enqueue; this worker's loop waits on that
wake-up, with the ordinary poll as the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq.worker import Worker, func
from redis.exceptions import RedisError

from tokenrelay.shared import queue
from tokenrelay.shared.redis import Backoff
from tokenrelay.shared.runtime import freeze_startup_heap
from tokenrelay.shared.settings import Settings
from tokenrelay.worker.context import WorkerContext
from tokenrelay.worker.jobs import generate

logger = logging.getLogger(__name__)

# Slack between the generation's own limit (a terminal `timeout` event) and
# arq's hard job timeout, so ours always fires first.
JOB_TIMEOUT_SLACK_S = 30


class TokenRelayWorker(Worker):
    """An arq Worker whose poll loop also wakes on ``Control.wake``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._wake = asyncio.Event()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()  # a slot is free: look at the queue again now

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs`` with the claim in one script instead of WATCH / EXISTS /
        ZSCORE / MULTI: three round trips fewer between the wake-up and the first token.

        Same rule as arq's: a job is claimed (its in-progress key set) only if no one
        holds it and it is still queued and due.
        """
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return None
            self.job_counter = self.job_counter + 1
            job_id = job_id_b.decode()
            score = await queue.claim(self.pool, self.queue_name, job_id,
                                      self.in_progress_timeout_s)
            if score is None:  # running elsewhere, finished, or re-queued for later
                self.job_counter = self.job_counter - 1
                self.sem.release()
                logger.debug("job %s already running elsewhere", job_id)
                continue
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await queue.open_queue(self.redis_settings, self.queue_name)
        logger.info("worker starting: %s", ", ".join(self.functions))
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._wake = WorkerContext.of(self.ctx).control.wake
        backoff = Backoff(self.poll_delay_s, 5.0)
        while True:
            self._wake.clear()
            try:
                await self._poll_iteration()
                backoff.reset()
            except (RedisError, OSError) as exc:
                # arq would let this end the worker; ride out a Redis outage instead.
                logger.warning("queue poll failed (%s); retrying in %.1fs", exc, backoff.delay)
                await backoff.sleep()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_delay_s)


def create_worker(settings: Settings, concurrency: int | None = None) -> TokenRelayWorker:
    if not settings.redis_url:
        raise SystemExit("TOKENRELAY_REDIS_URL is not set")
    redis_url = settings.redis_url

    async def on_startup(ctx: dict[str, Any]) -> None:
        WorkerContext.open(settings, redis_url, ctx["redis"]).attach(ctx)
        freeze_startup_heap()

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        await WorkerContext.of(ctx).close()

    return TokenRelayWorker(
        functions=[
            func(
                generate,
                name=queue.JOB_NAME,
                timeout=settings.max_generation_s + JOB_TIMEOUT_SLACK_S,
                max_tries=3,
            )
        ],
        queue_name=settings.queue_name,
        redis_settings=queue.redis_settings(settings.queue_url or redis_url),
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=concurrency or settings.worker_concurrency,
        poll_delay=0.5,
        keep_result=60,
        health_check_interval=15,
        handle_signals=True,
        # On SIGTERM: stop taking jobs, let running generations finish for this long,
        # then cancel them; each cancelled one is handed over (see jobs.generate).
        job_completion_wait=int(settings.worker_grace_s),
    )


def run(settings: Settings, concurrency: int | None = None) -> None:
    asyncio.set_event_loop(_new_loop())
    create_worker(settings, concurrency).run()


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (uvicorn[standard] brings it, as for the API): every delta is
    a Redis round trip, and the stock loop's per-I/O overhead capped one worker's rate."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
