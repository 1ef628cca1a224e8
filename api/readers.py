"""How the hub reads its active streams from Redis: one strategy, two implementations.

    Hub ──add(channel)──▶ StreamReader
                            ├─ SingleReader:  one ReadLoop, one XREAD over every active stream
                            └─ ClusterReader: one ReadLoop per hash slot with active streams
    ReadLoop ── XREAD BLOCK (Roster.command) ──▶ Roster.deliver(reply): channel.append
                                                  (viewers woken), cursors advanced, lag observed

A :class:`ReadLoop` holds a dedicated blocking connection (socket timeout above
the block time, no retries) and reads its channels' streams from their cursors
(its :class:`Roster`, which keeps the command packed between reads),
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
import operator
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from tokenrelay.api.channel import Channel
from tokenrelay.shared import keys
from tokenrelay.shared.redis import Backoff, create_blocking_redis

logger = logging.getLogger(__name__)

BLOCK_MS = 5000
READ_COUNT = 500

# Called once per read with its lag: seconds from the append of the newest entry of the
# read's stalest stream (the largest of its streams' lags) to the read.
LagObserver = Callable[[float], None]


class StreamReader(Protocol):
    """Reads the streams of the channels it is given, appending what comes to them."""

    def start(self) -> None:
        """Begin; a reader may also start reads only as channels come."""

    async def add(self, channel: Channel) -> None:
        """Read ``channel``'s stream from its cursor on, until it ends or loses its viewers."""

    async def stop(self) -> None:
        """End every read, close the connections, remove the wake streams."""


def _arg(value: bytes) -> bytes:
    """One argument of a command as Redis's protocol (RESP) sends it."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


# XREAD COUNT n BLOCK ms STREAMS, before the keys and then their cursors.
_XREAD = b"".join(map(_arg, (b"XREAD", b"COUNT", b"%d" % READ_COUNT, b"BLOCK", b"%d" % BLOCK_MS,
                             b"STREAMS")))
_closed = operator.attrgetter("closed")  # any(map(_closed, ...)): no Python frame per channel


class Roster:
    """The streams one loop reads, their channels, and the XREAD naming them, kept packed.

    Packing a command that names every active stream anew for each read (redis-py
    encodes its 2N arguments one by one) and parsing the reply into a dict per entry
    (and collecting those dicts) cost the hub more than delivering the entries
    (docs/benchmarks.md, issue 15). Here a key is packed once and a cursor when it
    advances, so a read only joins the pieces; the reply stays the nested lists hiredis
    makes, an entry's fields a flat list. A stream's place in the lists does not matter
    to XREAD: a removed one's place goes to the last. The loop changes a roster only
    between reads, so a reply goes to the channels its command was built from.
    """

    def __init__(self, wake_key: str):
        # Per stream, by its place in the command: channel, key, key and cursor packed.
        self.channels: list[Channel] = []
        self._keys: list[bytes] = []
        self._key_args: list[bytes] = []
        self._cursor_args: list[bytes] = []
        self._places: dict[bytes, int] = {}  # stream key -> place
        self._wake_key = wake_key.encode()
        self._wake_key_arg = _arg(self._wake_key)
        self._wake_cursor_arg = _arg(b"0-0")

    def __len__(self) -> int:
        return len(self.channels)

    def __contains__(self, key: str) -> bool:
        return key.encode() in self._places

    def put(self, key: str, channel: Channel) -> None:
        """Read ``channel`` from its cursor on, instead of the stream's former channel."""
        raw = key.encode()
        place = self._places.get(raw)
        if place is not None:
            self._remove(place)
        if channel.active:
            self._places[raw] = len(self._keys)
            self._keys.append(raw)
            self._key_args.append(_arg(raw))
            self._cursor_args.append(_arg(channel.cursor.encode()))
            self.channels.append(channel)

    def _remove(self, place: int) -> None:
        del self._places[self._keys[place]]
        for items in (self._keys, self._key_args, self._cursor_args):
            items[place] = items[-1]
            items.pop()
        self.channels[place] = self.channels[-1]
        self.channels.pop()
        if place < len(self._keys):
            self._places[self._keys[place]] = place

    def sweep(self) -> None:
        """Forget the channels their last viewer left. Between reads nothing else ends a
        channel: an end or a failure comes with a delivery, and is seen there."""
        if any(map(_closed, self.channels)):
            for place in reversed(range(len(self.channels))):
                if self.channels[place].closed:
                    self._remove(place)

    def command(self) -> bytes:
        """The XREAD of every stream from its cursor, and of the wake stream, packed."""
        parts = [b"*%d\r\n" % (8 + 2 * len(self._keys)), _XREAD]
        parts += self._key_args
        parts.append(self._wake_key_arg)
        parts += self._cursor_args
        parts.append(self._wake_cursor_arg)
        return b"".join(parts)

    def deliver(self, reply: list[Any], on_lag: LagObserver | None) -> None:
        """Append each stream's entries of an XREAD reply to its channel (which wakes its
        viewers) and advance its cursor; forget the streams that ended; report the lag.
        A stream of no channel, or of a closed one, is skipped."""
        newest_ms = None  # of the stalest stream
        for raw_key, entries in reply:
            place = self._places.get(raw_key)
            if place is None:
                if raw_key == self._wake_key and entries:
                    self._wake_cursor_arg = _arg(entries[-1][0])
                continue
            channel = self.channels[place]
            if channel.closed or not entries:
                continue
            try:
                channel.append(entries)
            except (KeyError, ValueError) as exc:  # a malformed entry: only its stream fails
                logger.error("hub cannot decode an event of generation_id=%s: %r",
                             channel.gen_id, exc)
                channel.fail(exc)
                self._remove(place)
                continue
            self._cursor_args[place] = _arg(entries[-1][0])
            stream_ms = channel.ids[-1][0]
            if newest_ms is None or stream_ms < newest_ms:
                newest_ms = stream_ms
            if channel.done:
                self._remove(place)
        if on_lag is not None and newest_ms is not None:
            on_lag(max(0.0, time.time() - newest_ms / 1000))


class ReadLoop:
    """One blocking XREAD at a time over a roster of channels' streams and a wake stream."""

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
        self.roster = Roster(wake_key)
        self.reading = False  # an XREAD of the roster is in flight
        self._added: dict[str, Channel] = {}  # by stream key, for the roster's next read
        self._redis = redis  # the pooled client: wakes, clean-up
        self._connect = connect
        self._on_lag = on_lag
        self._linger = linger  # idle: wait for a channel (True) or end (False)
        self._on_moved = on_moved
        self._on_exit = on_exit
        self._client: Redis | None = None
        self._conn: Connection | None = None  # the client's one connection
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"tr-hub-read-{self.label}")

    async def add(self, channel: Channel) -> None:
        key = keys.events(channel.gen_id)
        self._added[key] = channel
        if self._task is None or self._task.done():
            self.start()
        elif self.reading and key not in self.roster:
            await self._wake()
        else:
            self._changed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        roster = self.roster
        try:
            while True:
                for key, channel in self._added.items():
                    roster.put(key, channel)
                self._added.clear()
                roster.sweep()
                if not roster:
                    if not self._linger:
                        return
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                self.reading = True
                try:
                    reply = await self._read(roster.command())
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
                    self.reading = False
                if reply:
                    roster.deliver(reply, self._on_lag)
        finally:
            if self._on_exit is not None:
                self._on_exit(self)  # before any await: a new channel then starts a new loop
            await self._close()
            with contextlib.suppress(RedisError, OSError):
                await self._redis.delete(self.wake_key)

    async def _read(self, command: bytes) -> list[Any] | None:
        """Send a packed XREAD on the blocking connection; its reply as hiredis parses it
        (None when the block timed out). No response callback: the roster reads the lists."""
        if self._conn is None:
            client = self._client = await self._connect()
            await client.initialize()  # a single-connection client: connects its connection
            self._conn = client.connection
            if self._conn is None:
                raise RedisConnectionError(f"no connection for the hub read ({self.label})")
        await self._conn.send_packed_command(command, check_health=False)
        reply: list[Any] | None = await self._conn.read_response()
        return reply

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
        self._conn = None
        if self._client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
            self._client = None


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
