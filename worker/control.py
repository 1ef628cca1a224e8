"""A worker process's control channel: queue wake-ups and cancel requests over pub/sub.

One pub/sub connection per worker process carries both: an enqueue wakes the
poll loop at once (instead of arq's ``poll_delay``), and a cancel reaches the
running generation within a round trip. Pub/sub is lossy across reconnects, so
a slow poll of the cancel flags backs it up. The same poll asks presence about the
generations whose request said ``on_disconnect: cancel``: one with no viewer on any
API process for ABANDON_GRACE_S is cancelled like any other (its flag set, then its
cancel event). The worker that runs a generation watches it, so the check survives
any API process, and a lost worker's successor takes it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.shared import keys, presence
from tokenrelay.shared.redis import Backoff, text
from tokenrelay.worker.tasks import stop_tasks

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 1.0


class Control:
    def __init__(self, redis: Redis, channels: Redis | None = None, *,
                 abandon_grace_s: float = 10.0, presence_ttl_s: float = 3.0):
        self._redis = redis  # cancel flags, next to the generations' streams
        self._channels = channels or redis  # pub/sub: the queue's Redis (never a Cluster)
        self._grace_s = abandon_grace_s
        self._keep_ms = presence.lifetime_ms(presence_ttl_s, abandon_grace_s)
        # Generations to cancel when abandoned (a count: two runs of one may overlap here).
        self._abandonable: dict[str, int] = {}
        self.abandoned: set[str] = set()  # cancelled by this worker for want of a viewer
        self.wake = asyncio.Event()
        # A set per generation: two runs of one generation in one process (a restart
        # landing here) each keep their own event, and a cancel reaches both.
        self._cancels: dict[str, set[asyncio.Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="tr-control-listen"),
            asyncio.create_task(self._poll_cancels(), name="tr-control-poll"),
        ]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)

    def watch(self, gen_id: str) -> asyncio.Event:
        """An event set when a cancel of ``gen_id`` is requested; call ``unwatch`` after."""
        event = asyncio.Event()
        self._cancels.setdefault(gen_id, set()).add(event)
        return event

    def unwatch(self, gen_id: str, event: asyncio.Event) -> None:
        events = self._cancels.get(gen_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._cancels[gen_id]

    def watch_presence(self, gen_id: str) -> None:
        """Cancel ``gen_id`` once it has had no viewer for the grace (``on_disconnect:
        cancel``); call ``unwatch_presence`` after."""
        self._abandonable[gen_id] = self._abandonable.get(gen_id, 0) + 1

    def unwatch_presence(self, gen_id: str) -> None:
        left = self._abandonable.pop(gen_id, 1) - 1
        if left > 0:
            self._abandonable[gen_id] = left
        else:
            self.abandoned.discard(gen_id)

    def _cancel(self, gen_id: str) -> None:
        for event in self._cancels.get(gen_id, ()):
            if not event.is_set():
                logger.info("cancel requested generation_id=%s", gen_id)
                event.set()

    async def _listen(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            pubsub = self._channels.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.WAKE_CHANNEL, keys.CANCEL_CHANNEL)
                backoff.reset()
                self.wake.set()  # we may have missed wake-ups while (re)connecting
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    channel = message["channel"]
                    if channel in (keys.CANCEL_CHANNEL, keys.CANCEL_CHANNEL.encode()):
                        self._cancel(text(message["data"]))
                    else:
                        self.wake.set()
            except (RedisError, OSError) as exc:
                logger.warning("control channel lost (%s); reconnecting in %.1fs", exc,
                               backoff.delay)
                await backoff.sleep()
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _poll_cancels(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            ids = list(self._cancels)
            if not ids:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for gen_id in ids:
                        pipe.exists(keys.cancel(gen_id))
                    flags = await pipe.execute()
            except (RedisError, OSError) as exc:
                logger.warning("cancel poll failed: %s", exc)
                continue
            for gen_id, flag in zip(ids, flags, strict=True):
                if flag:
                    self._cancel(gen_id)
            await self._cancel_abandoned()

    async def _cancel_abandoned(self) -> None:
        watched = [gen_id for gen_id in self._abandonable if gen_id not in self.abandoned]
        try:
            found = await presence.abandoned(self._redis, watched, self._grace_s, self._keep_ms)
        except (RedisError, OSError) as exc:
            logger.warning("presence check failed: %s", exc)
            return
        for gen_id in found:
            logger.info("no viewer for %gs: cancelling generation_id=%s", self._grace_s, gen_id)
            self.abandoned.add(gen_id)
            self._cancel(gen_id)
