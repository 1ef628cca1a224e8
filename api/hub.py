"""One hub per API process: each active stream is read from Redis once and fanned out in memory.

    viewers ──join──▶ Hub.channels[gen_id] ◀── one XREAD loop (all active streams, one call)
       ▲                   │ frames (encoded once, shared, append-only)
       └──── take(pos) ────┘

A channel holds the encoded SSE frames of one generation, in order, shared by
all its local viewers; a viewer is only a position in that list, so its own
memory is constant and a slow viewer slows nobody. A viewer parks a future on
the channel; one ``notify`` per XREAD batch resolves them all, and each viewer
then writes every frame it has not sent yet in one chunk (built once for all
viewers at the same position). The list is capped; a viewer that falls behind
the cap reads the missing part from Redis at its own pace.

Seam without gap or duplicate: the first viewer of a stream loads the retained
tail with one XREVRANGE, and the channel's read cursor is the last id loaded, so
the XREAD loop continues exactly after it. Later viewers start from the
channel's memory.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.api.sse import Connections
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys
from tokenrelay.shared.redis import create_blocking_redis

logger = logging.getLogger(__name__)

BLOCK_MS = 5000
READ_COUNT = 500
# At most this many frames in one write: bounds a viewer's chunk, and so the
# bytes one stalled socket can hold beyond its transport's high-water mark.
CHUNK_FRAMES = 256


class Channel:
    """The in-memory tail of one generation's stream, shared by this process's viewers."""

    def __init__(self, gen_id: str, max_frames: int):
        self.gen_id = gen_id
        self.key = keys.events(gen_id)
        self.ids: list[ev.StreamId] = []
        self.frames: list[bytes] = []
        self.terminal_at: int | None = None  # absolute index of the terminal frame
        self.base = 0  # absolute index of frames[0]
        self.head_complete = True  # False when entries before ids[0] exist only in Redis
        self.cursor: str | None = None  # last entry id read from Redis
        self.owner: str | None = None  # the tenant, read with the tail (None: meta gone)
        self.viewers = 0
        self.failed: BaseException | None = None
        self.loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._max_frames = max_frames
        self._waiters: list[asyncio.Future[None]] = []
        self._chunk: tuple[int, int, bytes] = (-1, -1, b"")  # (pos, stop, joined frames)

    @property
    def done(self) -> bool:
        return self.terminal_at is not None

    @property
    def end(self) -> int:
        return self.base + len(self.frames)

    def append(self, entries: list[tuple[bytes | str, dict[bytes | str, bytes | str]]]) -> None:
        if not entries:
            return
        for entry_id, fields in entries:
            eid, etype, frame = ev.frame_of_entry(entry_id, fields)
            self.ids.append(ev.parse_id(eid))
            self.frames.append(frame)
            self.cursor = eid
            if etype in ev.TERMINAL_TYPES:
                self.terminal_at = self.end - 1
        if len(self.frames) > self._max_frames:
            drop = len(self.frames) - self._max_frames // 2
            del self.frames[:drop]
            del self.ids[:drop]
            self.base += drop
            self.head_complete = False
        self.notify()

    def notify(self) -> None:
        """Wake every parked viewer (one future each, resolved in one pass)."""
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def park(self, future: asyncio.Future[None]) -> None:
        """Resolve ``future`` at the next append (or failure)."""
        waiters = self._waiters
        waiters.append(future)
        if len(waiters) > 2 * self.viewers + 64:
            # Viewers that left while parked leave done futures behind; drop them.
            self._waiters = [f for f in waiters if not f.done()]

    @property
    def parked(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def position_after(self, last: ev.StreamId | None) -> int | None:
        """Absolute index of the first frame after ``last``; None if that part was trimmed."""
        if last is None:
            return self.base if self.head_complete else None
        if not self.head_complete and (not self.ids or last < self.ids[0]):
            return None
        return self.base + bisect.bisect_right(self.ids, last)

    def id_at(self, pos: int) -> ev.StreamId:
        return self.ids[pos - self.base]

    def take(self, pos: int) -> tuple[bytes, int, bool]:
        """(frames from pos joined into one chunk, new pos, whether the terminal was included).

        Viewers at the same position share one joined chunk.
        """
        stop = min(self.end, pos + CHUNK_FRAMES)
        cached_pos, cached_stop, chunk = self._chunk
        if cached_pos != pos or cached_stop != stop:
            chunk = b"".join(self.frames[pos - self.base : stop - self.base])
            self._chunk = (pos, stop, chunk)
        return chunk, stop, self.terminal_at is not None and self.terminal_at < stop


class Hub:
    def __init__(self, redis: Redis, redis_url: str, max_frames: int, *,
                 heartbeat_s: float = 15.0, send_timeout_s: float = 30.0):
        self._redis = redis
        self._redis_url = redis_url
        self._max_frames = max_frames
        self.node_id = secrets.token_hex(8)
        self._wake_key = keys.hub_wake(self.node_id)
        self._wake_cursor = "0-0"
        self.channels: dict[str, Channel] = {}
        self.connections = Connections(heartbeat_s, send_timeout_s)
        self._changed = asyncio.Event()
        self._in_read = False
        self._task: asyncio.Task[None] | None = None
        self._reader: Redis | None = None
        self.reads = 0  # XREAD calls, for metrics and tests
        # Called with each batch's lag (seconds from the last entry's append to its read).
        self.on_lag: Callable[[float], None] | None = None
        self.catchup_reads = 0  # XRANGE pages read by viewers behind the channels' memory

    @property
    def viewer_count(self) -> int:
        return sum(ch.viewers for ch in self.channels.values())

    def observe_lag(self, entries: list[Any]) -> None:
        """Report how long the newest entry of a batch waited between append and read."""
        if self.on_lag is not None:
            appended_ms = int(ev.parse_id(_entry_id(entries[-1][0]))[0])
            self.on_lag(max(0.0, time.time() - appended_ms / 1000))

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop(), name="tr-hub")
        self.connections.start()

    async def stop(self) -> None:
        await self.connections.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._reader is not None:
            await self._reader.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._wake_key)

    async def join(self, gen_id: str) -> Channel:
        """Register a viewer of ``gen_id``; the first one loads the stream's retained tail."""
        channel = self.channels.get(gen_id)
        if channel is None:
            channel = self.channels[gen_id] = Channel(gen_id, self._max_frames)
            asyncio.create_task(self._load(channel), name=f"tr-hub-load-{gen_id}")
        channel.viewers += 1
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
        if channel.viewers <= 0 and self.channels.get(channel.gen_id) is channel:
            del self.channels[channel.gen_id]

    async def _load(self, channel: Channel) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xrevrange(channel.key, count=self._max_frames // 2)
                pipe.hget(keys.meta(channel.gen_id), "tenant")
                entries, owner = await pipe.execute()
        except (RedisError, OSError) as exc:
            channel.failed = exc
            if self.channels.get(channel.gen_id) is channel:
                del self.channels[channel.gen_id]
            channel.loaded.set_exception(exc)
            channel.notify()
            return
        if owner is not None:
            channel.owner = owner.decode() if isinstance(owner, bytes) else str(owner)
        entries.reverse()
        channel.append(entries)
        if len(entries) >= self._max_frames // 2:
            channel.head_complete = False  # older entries may exist: viewers read them from Redis
        if channel.cursor is None:
            channel.cursor = "0-0"
        channel.loaded.set_result(None)
        if not channel.done:
            self._changed.set()
            if self._in_read:
                await self._wake()

    async def _wake(self) -> None:
        """Interrupt the blocking XREAD so it picks up the new stream now."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("hub wake failed: %s", exc)

    async def _read_loop(self) -> None:
        backoff = 0.05
        while True:
            active = {
                ch.key: ch
                for ch in self.channels.values()
                if ch.cursor is not None and not ch.done and ch.failed is None
            }
            if not active:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams: dict[Any, Any] = {key: ch.cursor for key, ch in active.items()}
            streams[self._wake_key] = self._wake_cursor
            if self._reader is None:
                self._reader = create_blocking_redis(self._redis_url, "hub", BLOCK_MS / 1000)
            self._in_read = True
            try:
                response = await self._reader.xread(streams, count=READ_COUNT, block=BLOCK_MS)
                backoff = 0.05
            except (RedisError, OSError) as exc:
                logger.warning("hub read failed (%s); retrying in %.2fs", exc, backoff)
                await self._reader.aclose()
                self._reader = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            finally:
                self._in_read = False
            self.reads += 1
            for raw_key, entries in response or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
                if key == self._wake_key:
                    last = entries[-1][0]
                    self._wake_cursor = last.decode() if isinstance(last, bytes) else last
                    continue
                channel = active.get(key)
                if channel is not None and self.channels.get(channel.gen_id) is channel:
                    channel.append(entries)
                    self.observe_lag(entries)


def _entry_id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
