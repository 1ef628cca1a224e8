"""The hub on a Redis Cluster: one blocking XREAD per hash slot that has active streams.

A Cluster refuses a multi-key command whose keys sit in different slots (CROSSSLOT),
even on one node, so the single XREAD of ``api.hub.Hub`` cannot span generations.
Here a supervisor groups the active streams by slot; each group has its own reader
task, a blocking connection to the node that owns the slot, and a private wake
stream whose key hashes to that same slot (it borrows the hash tag of the group's
first generation), so a stream joining the group interrupts that read only.

    supervisor ──(channels by slot)──▶ SlotReader(slot) ── XREAD BLOCK ──▶ owning node
                                         └── wake: tr:hub:{<gen id>}:wake:<node id>

Everything else (channels, viewers, the seam between tail and live) is the Hub's.
A slot's reader ends when its streams have all ended or lost their viewers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError

from tokenrelay.api.hub import BLOCK_MS, READ_COUNT, Channel, Hub
from tokenrelay.shared import keys
from tokenrelay.shared.redis import create_blocking_redis

logger = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SlotReader:
    """Reads the active streams of one hash slot with one blocking XREAD at a time."""

    def __init__(self, hub: ClusterHub, slot: int, tag: str):
        self.hub = hub
        self.slot = slot
        self.wake_key = keys.hub_slot_wake(tag, hub.node_id)
        self.wake_cursor = "0-0"
        self.channels: dict[str, Channel] = {}  # assigned by the supervisor
        self.reading: set[str] = set()  # keys in the XREAD now in flight
        self.task: asyncio.Task[None] | None = None
        self._reader: Redis | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"tr-hub-slot-{self.slot}")

    async def wake(self) -> None:
        """Interrupt the blocking XREAD so it picks up a new stream now."""
        try:
            async with self.hub._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.expire(self.wake_key, 3600)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("hub wake failed (slot %d): %s", self.slot, exc)

    def _active(self) -> dict[str, Channel]:
        hub = self.hub
        return {
            key: ch for key, ch in self.channels.items()
            if ch.cursor is not None and not ch.done and ch.failed is None
            and hub.channels.get(ch.gen_id) is ch
        }

    async def _connect(self) -> Redis:
        cluster: RedisCluster = self.hub._redis  # type: ignore[assignment]
        node = cluster.get_node_from_key(self.wake_key)
        if node is None:
            raise RedisError(f"no node serves slot {self.slot}")
        return create_blocking_redis(f"redis://{node.host}:{node.port}/0", "hub",
                                     BLOCK_MS / 1000)

    async def _run(self) -> None:
        backoff = 0.05
        try:
            while True:
                active = self._active()
                if not active:
                    return
                self.reading = set(active)
                streams: dict[Any, Any] = {key: ch.cursor for key, ch in active.items()}
                streams[self.wake_key] = self.wake_cursor
                try:
                    if self._reader is None:
                        self._reader = await self._connect()
                    response = await self._reader.xread(streams, count=READ_COUNT,
                                                        block=BLOCK_MS)
                    backoff = 0.05
                except (RedisError, OSError) as exc:
                    logger.warning("hub read failed (slot %d: %s); retrying in %.2fs",
                                   self.slot, exc, backoff)
                    await self._close()
                    if isinstance(exc, ResponseError):  # MOVED after a failover or reshard
                        with contextlib.suppress(RedisError, OSError):
                            await self.hub._refresh_slots()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                self.hub.reads += 1
                for raw_key, entries in response or []:
                    key = _text(raw_key)
                    if key == self.wake_key:
                        self.wake_cursor = _text(entries[-1][0])
                        continue
                    channel = active.get(key)
                    if channel is not None and self.hub.channels.get(channel.gen_id) is channel:
                        channel.append(entries)
                        self.hub.observe_lag(entries)
        finally:
            self.reading = set()
            if self.hub._slot_readers.get(self.slot) is self:
                del self.hub._slot_readers[self.slot]
            await self._close()
            with contextlib.suppress(RedisError, OSError):
                await self.hub._redis.delete(self.wake_key)
            self.hub._changed.set()  # a stream may have joined while this reader was ending

    async def _close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._reader.aclose()
            self._reader = None


class ClusterHub(Hub):
    """A Hub whose reads go per hash slot, for streams kept on a Redis Cluster."""

    def __init__(self, redis: Redis, redis_url: str, max_frames: int, *,
                 heartbeat_s: float = 15.0, send_timeout_s: float = 30.0):
        super().__init__(redis, redis_url, max_frames, heartbeat_s=heartbeat_s,
                         send_timeout_s=send_timeout_s)
        self._slot_readers: dict[int, SlotReader] = {}

    @property
    def slot_readers(self) -> int:
        """Blocking reads in flight (one per slot with active streams), for tests and metrics."""
        return len(self._slot_readers)

    async def _read_loop(self) -> None:
        """Supervise: give each slot's reader its streams, start or wake readers as they change.

        ``Hub._load`` sets ``_changed`` when a stream becomes active; ``_in_read``
        stays False, so the base class never wakes a read itself.
        """
        while True:
            self._changed.clear()
            by_slot: dict[int, dict[str, Channel]] = {}
            for ch in list(self.channels.values()):
                if ch.cursor is not None and not ch.done and ch.failed is None:
                    by_slot.setdefault(key_slot(ch.key.encode()), {})[ch.key] = ch
            for slot, group in by_slot.items():
                reader = self._slot_readers.get(slot)
                if reader is None:
                    reader = self._slot_readers[slot] = SlotReader(
                        self, slot, next(iter(group.values())).gen_id)
                    reader.channels = group
                    reader.start()
                else:
                    reader.channels = group
                    if not set(group) <= reader.reading:
                        await reader.wake()
            await self._changed.wait()

    async def _refresh_slots(self) -> None:
        cluster: RedisCluster = self._redis  # type: ignore[assignment]
        await cluster.nodes_manager.initialize()

    async def stop(self) -> None:
        readers = list(self._slot_readers.values())
        for reader in readers:
            if reader.task is not None:
                reader.task.cancel()
        for reader in readers:
            if reader.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await reader.task
        await super().stop()
