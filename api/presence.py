"""This API process's share of presence: its viewer counts, written to Redis in batches.

    hub.join / hub.leave ──mark(gen_id)──▶ dirty ──(FLUSH_S later, one pipeline)──▶ Redis
    every PRESENCE_REFRESH_S: every generation with local viewers again (keeps them alive)

Every protocol's viewers (SSE, the Chat Completions facade, and any other view of a
channel) join the hub, so the hub's channels are the one place they are counted. A
viewer coming or going costs no Redis write of its own: the changes of one moment
go out together, one script call per generation (shared/presence.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Mapping
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.shared import presence

logger = logging.getLogger(__name__)

# Changes are gathered this long before they are written (one batch per moment).
FLUSH_S = 0.1
# A shutting-down process withdraws its counts within this long, or leaves them to expire.
WITHDRAW_S = 1.0


class Counted(Protocol):
    """A channel, as far as presence cares: how many local viewers it has."""

    viewers: int


class Presence:
    """Publishes the viewer counts of ``channels`` (the hub's) for this process."""

    def __init__(self, redis: Redis, channels: Mapping[str, Counted], *, refresh_s: float,
                 ttl_s: float, grace_s: float):
        self._redis = redis
        self._channels = channels
        self._refresh_s = refresh_s
        self._ttl_s = ttl_s
        self._keep_ms = presence.lifetime_ms(ttl_s, grace_s)
        self.process = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._dirty: set[str] = set()
        self._reported: set[str] = set()  # generations whose count of ours is in Redis
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def mark(self, gen_id: str) -> None:
        """``gen_id`` gained or lost a local viewer: write its count with the next batch."""
        self._dirty.add(gen_id)
        self._changed.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tr-presence")

    async def stop(self) -> None:
        """Stop refreshing and withdraw this process's counts (best effort: they expire)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        gone = dict.fromkeys(self._reported, 0)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._write(gone), WITHDRAW_S)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_refresh = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(),
                                       max(0.0, next_refresh - loop.time()))
            await asyncio.sleep(FLUSH_S)
            self._changed.clear()
            batch, self._dirty = self._dirty, set()
            if loop.time() >= next_refresh:
                next_refresh = loop.time() + self._refresh_s
                batch |= self._reported
                batch.update(g for g, ch in self._channels.items() if ch.viewers > 0)
            counts = {}
            for gen_id in batch:
                channel = self._channels.get(gen_id)
                viewers = channel.viewers if channel is not None else 0
                if viewers > 0 or gen_id in self._reported:
                    counts[gen_id] = viewers
            try:
                await self._write(counts)
            except (RedisError, OSError) as exc:
                logger.warning("presence not written (%s); retrying", exc)
                self._dirty |= counts.keys()  # again with the next refresh
                next_refresh = min(next_refresh, loop.time() + self._refresh_s)

    async def _write(self, counts: dict[str, int]) -> None:
        await presence.publish(self._redis, self.process, counts, self._ttl_s, self._keep_ms)
        for gen_id, viewers in counts.items():
            if viewers > 0:
                self._reported.add(gen_id)
            else:
                self._reported.discard(gen_id)
