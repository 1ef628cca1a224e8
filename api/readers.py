"""How the hub reads its active streams from Redis: one strategy, two implementations.

    Hub ──add(channel)──▶ StreamReader
                            ├─ SingleReader:  one ReadLoop, one XREAD over every active stream
                            └─ ClusterReader: one ReadLoop per hash slot with active streams
    ReadLoop ── XREAD BLOCK ──▶ deliver(batch): channel.append (viewers woken), lag observed

A :class:`ReadLoop` holds a dedicated blocking connection (socket timeout above
the block time, no retries) and reads its channels' streams from their cursors,
plus a private wake stream: a channel added while a read is in flight interrupts
it with an XADD there. A Redis Cluster refuses a multi-key command across slots
(CROSSSLOT), so there a loop serves one slot, on the node that owns it; its wake
stream borrows the hash tag of a generation in that slot, and the loop ends
once its streams have all ended or lost their viewers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError

from tokenrelay.api.channel import Channel, Entry
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys
from tokenrelay.shared.redis import Backoff, create_blocking_redis, text

logger = logging.getLogger(__name__)

BLOCK_MS = 5000
READ_COUNT = 500

# Called with each batch's lag: seconds from its newest entry's append to its read.
LagObserver = Callable[[float], None]


class StreamReader(Protocol):
    """Reads the streams of the channels it is given, appending what comes to them."""

    def start(self) -> None:
        """Begin; a reader may also start reads only as channels come."""

    async def add(self, channel: Channel) -> None:
        """Read ``channel``'s stream from its cursor on, until it ends or loses its viewers."""

    async def stop(self) -> None:
        """End every read, close the connections, remove the wake streams."""



def deliver(batch: list[tuple[Any, list[Entry]]], channels: dict[str, Channel],
            on_lag: LagObserver | None) -> None:
    """Append each stream's entries of an XREAD reply to its channel (which wakes its
    viewers) and report their lag; streams of no channel, or of a closed one, are skipped."""
    for raw_key, entries in batch:
        channel = channels.get(text(raw_key))
        if channel is None or channel.closed or not entries:
            continue
        try:
            channel.append(entries)
        except (KeyError, ValueError) as exc:  # a malformed entry: only its stream fails
            logger.error("hub cannot decode an event of generation_id=%s: %r",
                         channel.gen_id, exc)
            channel.fail(exc)
            continue
        if on_lag is not None:
            appended_ms = ev.parse_id(text(entries[-1][0]))[0]
            on_lag(max(0.0, time.time() - appended_ms / 1000))


class ReadLoop:
    """One blocking XREAD at a time over a set of channels' streams and a wake stream."""

    def __init__(
        self,
        redis: Redis,
        wake_key: str,
        connect: Callable[[], Awaitable[Redis]],
        on_lag: LagObserver | None,
        *,
        label: str,
        linger: bool,
        on_moved: Callable[[], Awaitable[None]] | None = None,
        on_exit: Callable[[ReadLoop], None] | None = None,
    ):
        self.wake_key = wake_key
        self.label = label
        self.channels: dict[str, Channel] = {}  # by stream key
        self.in_flight: set[str] = set()  # stream keys of the XREAD in flight
        self._redis = redis  # the pooled client: wakes, clean-up
        self._connect = connect
        self._on_lag = on_lag
        self._linger = linger  # idle: wait for a channel (True) or end (False)
        self._on_moved = on_moved
        self._on_exit = on_exit
        self._conn: Redis | None = None
        self._wake_cursor = "0-0"
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"tr-hub-read-{self.label}")

    async def add(self, channel: Channel) -> None:
        key = keys.events(channel.gen_id)
        self.channels[key] = channel
        if self._task is None or self._task.done():
            self.start()
        elif self.in_flight and key not in self.in_flight:
            await self._wake()
        else:
            self._changed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _active(self) -> dict[str, Channel]:
        """The channels still to read; the others are forgotten."""
        self.channels = {key: ch for key, ch in self.channels.items() if ch.active}
        return self.channels

    async def _run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        try:
            while True:
                active = self._active()
                if not active:
                    if not self._linger:
                        return
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                streams: dict[Any, Any] = {key: ch.cursor for key, ch in active.items()}
                streams[self.wake_key] = self._wake_cursor
                self.in_flight = set(active)
                try:
                    if self._conn is None:
                        self._conn = await self._connect()
                    batch = await self._conn.xread(streams, count=READ_COUNT, block=BLOCK_MS)
                    backoff.reset()
                except (RedisError, OSError) as exc:
                    logger.warning("hub read failed (%s: %s); retrying in %.2fs",
                                   self.label, exc, backoff.delay)
                    await self._close()
                    if isinstance(exc, ResponseError) and self._on_moved is not None:
                        with contextlib.suppress(RedisError, OSError):
                            await self._on_moved()  # MOVED after a failover or reshard
                    await backoff.sleep()
                    continue
                finally:
                    self.in_flight = set()
                for raw_key, entries in batch or []:
                    if text(raw_key) == self.wake_key:
                        self._wake_cursor = text(entries[-1][0])
                deliver(batch or [], active, self._on_lag)
        finally:
            if self._on_exit is not None:
                self._on_exit(self)  # before any await: a new channel then starts a new loop
            await self._close()
            with contextlib.suppress(RedisError, OSError):
                await self._redis.delete(self.wake_key)

    async def _wake(self) -> None:
        """Interrupt the blocking XREAD so that it picks up a new stream now."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.expire(self.wake_key, 3600)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("hub wake failed (%s): %s", self.label, exc)

    async def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._conn.aclose()
            self._conn = None


class SingleReader:
    """One XREAD over every active stream of this process, for a Redis that is not a Cluster."""

    def __init__(self, redis: Redis, redis_url: str, on_lag: LagObserver | None = None):
        self._url = redis_url
        self._loop = ReadLoop(redis, keys.hub_wake(secrets.token_hex(8)), self._connect,
                              on_lag, label="all", linger=True)

    async def _connect(self) -> Redis:
        return create_blocking_redis(self._url, "hub", BLOCK_MS / 1000)

    def start(self) -> None:
        self._loop.start()

    async def add(self, channel: Channel) -> None:
        await self._loop.add(channel)

    async def stop(self) -> None:
        await self._loop.stop()


class ClusterReader:
    """One XREAD per hash slot with active streams, each on the node that owns the slot."""

    def __init__(self, redis: Redis, on_lag: LagObserver | None = None):
        self._cluster = cast(RedisCluster, redis)  # create_redis(cluster=True) types it Redis
        self._redis = redis
        self._node_id = secrets.token_hex(8)
        self._on_lag = on_lag
        self._loops: dict[int, ReadLoop] = {}

    def start(self) -> None:
        """Nothing to start: a slot's loop starts with its first stream."""

    async def add(self, channel: Channel) -> None:
        slot = key_slot(keys.events(channel.gen_id).encode())
        loop = self._loops.get(slot)
        if loop is None:
            # The wake stream shares the generation's hash tag, hence its slot.
            wake_key = keys.hub_slot_wake(channel.gen_id, self._node_id)

            async def connect() -> Redis:
                node = self._cluster.get_node_from_key(wake_key)
                if node is None:
                    raise RedisError(f"no node serves slot {slot}")
                return create_blocking_redis(f"redis://{node.host}:{node.port}/0", "hub",
                                             BLOCK_MS / 1000)

            loop = self._loops[slot] = ReadLoop(
                self._redis, wake_key, connect, self._on_lag, label=f"slot {slot}",
                linger=False, on_moved=self._refresh_slots, on_exit=self._forget)
        await loop.add(channel)

    def _forget(self, loop: ReadLoop) -> None:
        for slot, known in list(self._loops.items()):
            if known is loop:
                del self._loops[slot]

    async def _refresh_slots(self) -> None:
        await self._cluster.nodes_manager.initialize()

    async def stop(self) -> None:
        for loop in list(self._loops.values()):
            await loop.stop()


def create_reader(redis: Redis, redis_url: str, *, cluster: bool,
                  on_lag: LagObserver | None = None) -> StreamReader:
    """The reader that fits the deployment: per slot on a Redis Cluster, else one for all."""
    if cluster:
        return ClusterReader(redis, on_lag)
    return SingleReader(redis, redis_url, on_lag)
