"""One writer per worker process: what all its generations produced, appended in batches.

A generation's pump hands each delta to its ``Slot`` (no round trip, no await); the
writer's one task takes every slot's pending deltas and appends them with one script
call for many generations (``streams.append_batch``; on a Cluster, one call per hash
slot, side by side). While a call is in flight the next deltas gather, so a busy
worker makes few large calls and an idle one appends at once.

Guarantees, the same as one fenced append per delta:

- order: a slot's deltas are numbered (``seq``) as they come and written in order, each
  with an id the writer chose: Redis's time as the worker's clock reads it, above the
  slot's previous id and below the end of the worker's lease (``Clock``);
- fencing: Redis refuses those ids once a newer attempt started or the generation
  ended (``shared.streams``); the slot is then ``fenced`` and its pump stops at its next
  delta or ``drain``;
- exactly once: a batch whose reply was lost (Redis restarted) is sent again with the
  same ids, and Redis refuses what it had applied. A batch in flight is frozen: new
  deltas wait for the next one, so a retry never regroups entries.

``coalesce_s`` > 0 (``TOKENRELAY_COALESCE_MS``): the writer runs once per window and
consecutive text deltas of a slot within it become one entry (same text; fewer events).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.crc import key_slot

from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, streams
from tokenrelay.shared.redis import OUTAGE_ERRORS, OUTAGE_RETRY_S, Backoff
from tokenrelay.worker.tasks import stop_task

logger = logging.getLogger(__name__)

# Generations per script call: one call holds Redis for the time of its writes.
BATCH_GENERATIONS = 256
# Without a coalescing window, after a batch of fewer than SMALL_BATCH generations the
# writer waits MIN_GAP_S before the next, so a lightly loaded worker makes fewer, fuller
# calls (measured: 200 generations at 30 tokens/s, 40 -> 28 us of worker CPU per token).
# A busy worker's batches are large and go back to back (a pause there was measured to
# let batches, and latency, grow).
MIN_GAP_S = 0.002
SMALL_BATCH = 100
# Deltas a slot may hold unwritten before its pump waits (a Redis outage).
MAX_BACKLOG = 1024
# Single-key deltas of these fields merge by concatenation when coalescing.
_MERGEABLE = ("content", "reasoning")


class Clock(Protocol):
    """Redis's time as the worker reads it, and the end of its lease (``lease.RedisClock``)."""

    limit_ms: int  # the first millisecond a delta's id may not use

    def now_ms(self) -> int: ...


class Fenced(Exception):
    """A newer attempt owns the stream, or it has ended: this attempt must stop writing."""


class Slot:
    """One attempt of one generation, as the writer sees it."""

    __slots__ = ("gen_id", "last_id", "seq", "written", "texts", "pending", "inflight",
                 "fenced", "failure", "_drained")

    def __init__(self, gen_id: str, base: str):
        self.gen_id = gen_id
        # The last id handed out; first, the attempt's ``running`` entry (``streams.start``).
        self.last_id = ev.parse_id(base)
        self.seq = 0  # numbers handed out
        self.written = 0  # numbers Redis has acknowledged
        self.texts: list[str] = []  # the text Redis has acknowledged, in order
        self.pending: list[dict[str, Any]] = []
        self.inflight: streams.Appends | None = None
        self.fenced = False
        self.failure: BaseException | None = None  # Redis stayed away past the retries
        self._drained: asyncio.Future[None] | None = None

    @property
    def content(self) -> str:
        """The answer's text as written so far."""
        return "".join(self.texts)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.fenced:
            raise Fenced()

    def _settle(self) -> None:
        if self._drained is not None and not self._drained.done() and (
                self.fenced or self.failure is not None
                or (not self.pending and self.inflight is None)):
            self._drained.set_result(None)


class Writer:
    def __init__(self, redis: Redis, clock: Clock, *, cluster: bool = False,
                 coalesce_s: float = 0.0):
        self._redis = redis
        self._clock = clock
        self._cluster = cluster
        self.coalesce_s = coalesce_s
        self._dirty: dict[Slot, None] = {}  # slots with pending deltas, in arrival order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.calls = 0  # script calls made (for tests and benchmarks)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tr-writer")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)

    def append(self, slot: Slot, data: dict[str, Any]) -> None:
        """Queue one delta (event data) of ``slot``; raises ``Fenced`` (or the outage) once
        the slot may no longer write."""
        slot.check()
        pending = slot.pending
        if self.coalesce_s and pending and len(data) == 1 and len(pending[-1]) == 1:
            (field, value), = data.items()
            last = pending[-1]
            if field in last and field in _MERGEABLE:
                last[field] += value
                return
        pending.append(data)
        if slot not in self._dirty:
            self._dirty[slot] = None
            self._wake.set()

    def backlog(self, slot: Slot) -> int:
        return len(slot.pending)

    async def drain(self, slot: Slot) -> None:
        """Wait until every delta of ``slot`` is written; raises ``Fenced`` if it was
        refused (or the outage if Redis stayed away)."""
        if slot.pending or slot.inflight is not None:
            if slot._drained is None or slot._drained.done():
                slot._drained = asyncio.get_running_loop().create_future()
            slot._settle()
            await asyncio.shield(slot._drained)
        slot.check()

    def discard(self, slot: Slot) -> None:
        """Forget a slot's unwritten deltas (its attempt is over: handed over or ended)."""
        slot.pending.clear()
        self._dirty.pop(slot, None)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.coalesce_s:
                await asyncio.sleep(self.coalesce_s)
            if await self.flush() < SMALL_BATCH and not self.coalesce_s:
                await asyncio.sleep(MIN_GAP_S)

    async def flush(self) -> int:
        """Write every slot's pending deltas now (one batch per group of slots); how many
        slots it wrote."""
        slots = list(self._dirty)
        self._dirty.clear()
        clock = self._clock
        now_ms = min(clock.now_ms(), clock.limit_ms - 1)
        batch = []
        for slot in slots:
            if slot.fenced or slot.failure is not None:
                slot.pending.clear()
                slot._settle()
                continue
            if slot.inflight is None:
                slot.inflight = _take(slot, now_ms)
            batch.append(slot)
        if not batch:
            return 0
        await asyncio.gather(*(self._write(group) for group in self._groups(batch)))
        for slot in batch:
            if slot.pending and not slot.fenced:
                self._dirty[slot] = None
                self._wake.set()
            slot._settle()
        return len(batch)

    def _groups(self, slots: list[Slot]) -> Iterable[list[Slot]]:
        """Batches of slots one script call may carry: any on one Redis; one hash slot's
        on a Cluster (a script's keys must share a slot)."""
        if not self._cluster:
            for i in range(0, len(slots), BATCH_GENERATIONS):
                yield slots[i:i + BATCH_GENERATIONS]
            return
        by_slot: dict[int, list[Slot]] = {}
        for slot in slots:
            by_slot.setdefault(key_slot(keys.meta(slot.gen_id).encode()), []).append(slot)
        yield from by_slot.values()

    async def _write(self, slots: list[Slot]) -> None:
        """One script call for ``slots``' in-flight entries, retried through an outage."""
        batch = [slot.inflight for slot in slots if slot.inflight is not None]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OUTAGE_RETRY_S
        backoff = Backoff(0.05, 1.0)
        while True:
            try:
                self.calls += 1
                results = await streams.append_batch(self._redis, batch)
                break
            except OUTAGE_ERRORS as exc:
                if loop.time() < deadline:
                    logger.warning("redis write failed (%s); retrying %d generations",
                                   exc, len(slots))
                    await backoff.sleep()
                    continue
                failure: Exception = exc
            except Exception as exc:  # noqa: BLE001 - the writer serves every generation
                logger.exception("append failed for %d generations", len(slots))
                failure = exc
            for slot in slots:  # their pumps raise it at their next delta
                slot.failure = failure
                slot.inflight = None
            return
        for slot, ok in zip(slots, results, strict=True):
            assert slot.inflight is not None
            if ok:
                entries = slot.inflight.entries
                slot.written = slot.inflight.first_seq + len(entries) - 1
                slot.texts += [text for _id, _data, text in entries if text]
            else:
                slot.fenced = True
                slot.pending.clear()
            slot.inflight = None


def _take(slot: Slot, now_ms: int) -> streams.Appends:
    """A slot's pending deltas as numbered entries with their ids (frozen until
    acknowledged): at ``now_ms``, or just above the slot's last id if that is not older."""
    ms, seq = slot.last_id
    entries = []
    for data in slot.pending:
        if now_ms > ms:
            ms, seq = now_ms, 0
        else:
            seq += 1
        entries.append((f"{ms}-{seq}", ev.dumps(data), data.get("content") or ""))
    slot.last_id = (ms, seq)
    slot.pending.clear()
    first = slot.seq + 1
    slot.seq += len(entries)
    return streams.Appends(slot.gen_id, first, entries)
