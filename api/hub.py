"""One hub per API process: each active stream is read from Redis once and fanned out in memory.

    viewers ──join──▶ Hub.channels[gen_id] ◀── append ── StreamReader (api.readers)
       ▲                   │ events, frames (shared, append-only)
       └──── take(pos) ────┘

The hub owns the channels (api.channel) and the open SSE connections (api.sse);
reading Redis is its reader's. Seam without gap or duplicate: the first viewer of
a stream loads the retained tail with one XREVRANGE, and the channel's cursor is
the last id loaded, so the reader continues exactly after it. Later viewers
start from the channel's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.api.channel import Channel
from tokenrelay.api.readers import StreamReader
from tokenrelay.api.sse import Connections
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, streams

logger = logging.getLogger(__name__)

# Entries per XRANGE page for a viewer behind its channel's memory.
REDIS_PAGE = 500


class Hub:
    """This process's channels, their viewers' connections, and the reader that feeds them."""

    def __init__(self, redis: Redis, reader: StreamReader, max_events: int, *,
                 heartbeat_s: float = 15.0, send_timeout_s: float = 30.0):
        self._redis = redis
        self._reader = reader
        self._max_events = max_events
        self.channels: dict[str, Channel] = {}
        self.connections = Connections(heartbeat_s, send_timeout_s)
        self.catchup_reads = 0  # XRANGE pages read by viewers behind the channels' memory
        self._loads: set[asyncio.Task[None]] = set()
        # Told the generation each time a viewer joins or leaves (api.presence batches them).
        self.on_viewers: Callable[[str], None] | None = None

    @property
    def viewer_count(self) -> int:
        return sum(ch.viewers for ch in self.channels.values())

    def start(self) -> None:
        self.connections.start()
        self._reader.start()

    async def stop(self) -> None:
        await self.connections.stop()
        for task in list(self._loads):
            task.cancel()
        for task in list(self._loads):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._reader.stop()

    async def join(self, gen_id: str) -> Channel:
        """Register a viewer of ``gen_id``; the first one loads the stream's retained tail."""
        channel = self.channels.get(gen_id)
        if channel is None:
            channel = self.channels[gen_id] = Channel(gen_id, self._max_events)
            task = asyncio.create_task(self._load(channel), name=f"tr-hub-load-{gen_id}")
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
        channel.viewers += 1
        if self.on_viewers is not None:
            self.on_viewers(gen_id)
        if not channel.loaded.done():
            try:
                await asyncio.shield(channel.loaded)
            except BaseException:
                self.leave(channel)
                raise
        elif channel.failed is not None:
            self.leave(channel)
            raise channel.failed
        return channel

    def leave(self, channel: Channel) -> None:
        channel.viewers -= 1
        if self.on_viewers is not None:
            self.on_viewers(channel.gen_id)
        if channel.viewers <= 0:
            self._drop(channel)

    def _drop(self, channel: Channel) -> None:
        channel.closed = True
        if self.channels.get(channel.gen_id) is channel:
            del self.channels[channel.gen_id]

    async def read_after(self, gen_id: str, after: ev.StreamId | None) -> list[ev.Event]:
        """The next page of events after ``after`` straight from Redis, for a viewer behind
        its channel's memory."""
        self.catchup_reads += 1
        start = None if after is None else ev.format_id(after)
        entries = await streams.read_after(self._redis, gen_id, start, REDIS_PAGE)
        return [ev.decode_entry(entry_id, fields) for entry_id, fields in entries]

    async def _load(self, channel: Channel) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xrevrange(keys.events(channel.gen_id), count=self._max_events // 2)
                pipe.hget(keys.meta(channel.gen_id), "tenant")
                entries, owner = await pipe.execute()
            entries.reverse()
            channel.append(entries)
        except (RedisError, OSError, KeyError, ValueError) as exc:  # unreachable, or malformed
            self._drop(channel)
            channel.loaded.set_exception(exc)
            channel.fail(exc)
            return
        except asyncio.CancelledError:
            channel.loaded.cancel()  # the hub is stopping: its joiners give up too
            raise
        if owner is not None:
            channel.owner = owner.decode() if isinstance(owner, bytes) else str(owner)
        if len(entries) >= self._max_events // 2:
            channel.head_complete = False  # older entries may exist: viewers read them from Redis
        channel.loaded.set_result(None)
        # No owner: the generation does not exist (or has expired). Its joiners answer
        # 404 or 410, and the reader never hears of it: a wake of its XREAD would create
        # a key for a request that must change nothing.
        if channel.active and channel.owner is not None:
            await self._reader.add(channel)
