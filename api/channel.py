"""A channel (one generation's stream held in this process's memory) and its viewers.

    hub reader ──append(entries)──▶ Channel: ids, events (typed, decoded once)
                                      └─ frames per encoding (SSE, ...: encoded once)
    Viewer ──take(pos)──▶ a View of the channel: an encoding's frames, or the events

A channel holds the events of one generation in order, shared by all its local
viewers; a viewer is only a position in that list, so its own memory is constant
and a slow viewer slows nobody. Each wire protocol is an :class:`Encoding`: the
first of its viewers to reach an event encodes it, once per process, and every
viewer at the same position writes the same joined chunk. A viewer parks a future
on the channel; one ``notify`` per read batch wakes them all. The list is capped;
a viewer that falls behind the cap reads the missing part from Redis at its own
pace, and re-seeks in the channel by event id, so no seam has a gap or duplicate.
A protocol whose frame depends on the events before it is a fold
(:mod:`tokenrelay.api.fold`), its frames shared like an encoding's.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, Generic, Protocol, TypeVar

from tokenrelay.api.sse import NEED, Connection, Need
from tokenrelay.shared import events as ev

# At most this many events, and this many bytes (or one frame, if a frame is larger),
# in one hand-out: bounds a viewer's chunk, and so what one stalled socket can hold
# beyond its transport's high-water mark whatever size the events are.
CHUNK_FRAMES = 256
CHUNK_BYTES = 64 * 1024

# One XRANGE/XREAD entry: (id, fields), the fields a dict (redis-py's parsed reply) or the
# flat [name, value, ...] list of a raw reply (the hub's reads): see events.decode_entry.
Entry = Sequence[Any]
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Pushed(Protocol):
    """A viewer served without a task of its own (api.sse's DirectStream): the channel
    calls it."""

    parked: bool  # on the channel's list until its next notify; cleared when it leaves

    def wake(self) -> None: ...


class Trimmed(Protocol):
    """What a channel keeps per encoding: told when the channel drops its oldest events."""

    def trim(self, events: list[ev.Event], drop: int) -> None: ...


class _Frames:
    """One protocol's frames of a channel's events (from ``base``), filled as viewers ask."""

    __slots__ = ("items", "chunk")

    def __init__(self) -> None:
        self.items: list[bytes] = []
        # (pos, stop asked, stop given, joined frames): the chunk the viewers at pos share
        self.chunk: tuple[int, int, int, bytes] = (-1, -1, -1, b"")

    def trim(self, events: list[ev.Event], drop: int) -> None:
        """The channel drops its first ``drop`` events (still in ``events``)."""
        del self.items[:drop]

    def hand_out(self, channel: Channel, pos: int, stop: int) -> tuple[bytes, int, bool]:
        """The frames of [pos, stop) joined, cut at ``CHUNK_BYTES`` (shared by the viewers
        at ``pos``), as View.take."""
        cached_pos, cached_asked, given, chunk = self.chunk
        if cached_pos != pos or cached_asked != stop:
            frames = self.items[pos - channel.base : stop - channel.base]
            size = len(frames[0])
            count = 1
            while count < len(frames) and size + len(frames[count]) <= CHUNK_BYTES:
                size += len(frames[count])
                count += 1
            given = pos + count
            chunk = b"".join(frames[:count])
            self.chunk = (pos, stop, given, chunk)
        terminal_at = channel.terminal_at
        return chunk, given, terminal_at is not None and terminal_at < given


class Channel:
    """The in-memory tail of one generation's stream, shared by this process's viewers."""

    def __init__(self, gen_id: str, max_events: int):
        self.gen_id = gen_id
        self.ids: list[ev.StreamId] = []
        self.events: list[ev.Event] = []
        self.terminal_at: int | None = None  # absolute index of the terminal event
        self.base = 0  # absolute index of events[0]
        self.head_complete = True  # False when entries before ids[0] exist only in Redis
        self.cursor = "0-0"  # last entry id read from Redis
        self.owner: str | None = None  # the tenant, read with the tail (None: meta gone)
        self.viewers = 0
        self.closed = False  # left by its last viewer: nothing reads or serves it any more
        self.failed: BaseException | None = None
        self.loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._max_events = max_events
        self._waiters: list[asyncio.Future[None]] = []
        self._pushed: list[Pushed] = []  # viewers served from notify itself, no task each
        self.frames: dict[object, Trimmed] = {}  # per encoding or fold, filled as viewers ask
        self.priming: dict[object, asyncio.Future[None]] = {}  # folds being primed from Redis

    @property
    def done(self) -> bool:
        return self.terminal_at is not None

    @property
    def end(self) -> int:
        return self.base + len(self.events)

    @property
    def active(self) -> bool:
        """Whether the hub's reader should still read this stream."""
        return self.terminal_at is None and self.failed is None and not self.closed

    def append(self, entries: list[Entry]) -> None:
        """Take entries read from Redis, in order, and wake every parked viewer."""
        if not entries:
            return
        for entry_id, fields in entries:
            event = ev.decode_entry(entry_id, fields)
            self.ids.append(ev.parse_id(event.id))
            self.events.append(event)
            if event.type in ev.TERMINAL_TYPES:
                self.terminal_at = self.end - 1
        self.cursor = self.events[-1].id
        if len(self.events) > self._max_events:
            drop = len(self.events) - self._max_events // 2
            for frames in self.frames.values():
                frames.trim(self.events, drop)
            del self.events[:drop]
            del self.ids[:drop]
            self.base += drop
            self.head_complete = False
        self.notify()

    def fail(self, exc: BaseException) -> None:
        """End the channel with ``exc``: its viewers raise it once they have the rest."""
        self.failed = exc
        self.notify()

    def notify(self) -> None:
        """Wake every parked viewer (one future each, resolved in one pass), and serve the
        pushed ones at once: each writes its new frames from here, as nchan's loop does."""
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
        if self._pushed:
            pushed, self._pushed = self._pushed, []
            for viewer in pushed:
                viewer.parked = False
                viewer.wake()

    def park(self, future: asyncio.Future[None]) -> None:
        """Resolve ``future`` at the next append (or failure)."""
        waiters = self._waiters
        waiters.append(future)
        if len(waiters) > 2 * self.viewers + 64:
            # Viewers that left while parked leave done futures behind; drop them.
            self._waiters = [f for f in waiters if not f.done()]

    def park_pushed(self, viewer: Pushed) -> None:
        """Call ``viewer.wake()`` at the next append (or failure), once."""
        if viewer.parked:
            return
        viewer.parked = True
        pushed = self._pushed
        pushed.append(viewer)
        if len(pushed) > 2 * self.viewers + 64:
            # Viewers that left while parked (their flag cleared) stay until a notify.
            self._pushed = [v for v in pushed if v.parked]

    @property
    def parked(self) -> int:
        return (sum(1 for f in self._waiters if not f.done())
                + sum(1 for v in self._pushed if v.parked))

    def position_after(self, last: ev.StreamId | None) -> int | None:
        """Absolute index of the first event after ``last``; None if that part was trimmed."""
        if last is None:
            return self.base if self.head_complete else None
        if not self.head_complete and (not self.ids or last < self.ids[0]):
            return None
        return self.base + bisect.bisect_right(self.ids, last)

    def id_at(self, pos: int) -> ev.StreamId:
        return self.ids[pos - self.base]


class View(Protocol[T_co]):
    """What a viewer hands out: a channel's events in some form, a batch at a time."""

    @property
    def empty(self) -> T_co:
        """The batch of nothing (woken with nothing new)."""

    def take(self, channel: Channel, pos: int) -> tuple[T_co, int, bool]:
        """(the batch from ``pos``, new pos, whether the terminal was included)."""

    async def prepare(self, channel: Channel, hub: Membership) -> None:
        """Ready ``channel`` for this view (a fold primes its state); before the first take."""

    async def catch_up(self, hub: Membership, gen_id: str,
                       last: ev.StreamId | None) -> Callable[[list[ev.Event]], T_co]:
        """How to turn the pages read from Redis after ``last`` into batches (a viewer
        behind the channel's memory)."""


class Encoding:
    """A wire protocol as a View: each event's bytes, computed once per event per process.

    A protocol whose frame is a function of the event alone is one instance of
    this class (``Encoding("name", encode)``); its viewers share the channel's
    frames. A protocol with state per client (the OpenAI Chat Completions facade:
    model name, first chunk) reads the typed events (:data:`EVENTS`) instead.
    """

    __slots__ = ("name", "encode")
    empty = b""

    def __init__(self, name: str, encode: Callable[[ev.Event], bytes]):
        self.name = name
        self.encode = encode

    def take(self, channel: Channel, pos: int) -> tuple[bytes, int, bool]:
        """(frames from pos joined into one chunk, new pos, whether the terminal was included).

        Each event is encoded once per encoding, by whichever viewer reaches it
        first; viewers at the same position share one joined chunk.
        """
        frames = channel.frames.get(self)
        if not isinstance(frames, _Frames):
            frames = _Frames()
            channel.frames[self] = frames
        base, items = channel.base, frames.items
        stop = min(base + len(channel.events), pos + CHUNK_FRAMES)
        if len(items) < stop - base:
            items.extend(map(self.encode, channel.events[len(items) : stop - base]))
        return frames.hand_out(channel, pos, stop)

    async def prepare(self, channel: Channel, hub: Membership) -> None:
        return None

    async def catch_up(self, hub: Membership, gen_id: str,
                       last: ev.StreamId | None) -> Callable[[list[ev.Event]], bytes]:
        return self.of_events

    def of_events(self, events: list[ev.Event]) -> bytes:
        return b"".join(map(self.encode, events))

    def __repr__(self) -> str:
        return f"Encoding({self.name!r})"


class _Events:
    """The typed events themselves (decoded once per process), for in-process consumers."""

    empty: Sequence[ev.Event] = ()

    def take(self, channel: Channel, pos: int) -> tuple[Sequence[ev.Event], int, bool]:
        stop = min(channel.end, pos + CHUNK_FRAMES)
        terminal_at = channel.terminal_at
        batch = channel.events[pos - channel.base : stop - channel.base]
        return batch, stop, terminal_at is not None and terminal_at < stop

    async def prepare(self, channel: Channel, hub: Membership) -> None:
        return None

    async def catch_up(self, hub: Membership, gen_id: str, last: ev.StreamId | None
                       ) -> Callable[[list[ev.Event]], Sequence[ev.Event]]:
        return self.of_events

    def of_events(self, events: list[ev.Event]) -> Sequence[ev.Event]:
        return events


SSE = Encoding("sse", ev.encode_event)
EVENTS = _Events()


class _Need(enum.Enum):
    """What a viewer's next batch waits for, when the channel's memory has none for it."""

    SETUP = "join the channel, prepare the view"
    REDIS = "read a page from Redis (behind the channel's memory)"
    NOTHING_NEW = "the next append"


# Read as globals on the hot path: an enum member read through its class costs ~110 ns in
# CPython 3.11 (a global ~7), and a fan-out's poll read four or five per viewer and event.
_SETUP: Final = _Need.SETUP
_REDIS: Final = _Need.REDIS
_NOTHING_NEW: Final = _Need.NOTHING_NEW


class Membership(Protocol):
    """Where viewers join their channel and read what it no longer holds (the hub)."""

    async def join(self, gen_id: str) -> Channel: ...

    def leave(self, channel: Channel) -> None: ...

    async def read_after(self, gen_id: str, after: ev.StreamId | None) -> list[ev.Event]: ...


class Viewer(Generic[T]):
    """One viewer of ``gen_id``: what comes after ``after``, as ``view`` batches.

    Its position is an index into the channel; when the part it needs has left
    the channel's memory it reads a page from Redis and re-seeks by event id.
    """

    __slots__ = ("hub", "gen_id", "view", "last", "pos", "channel", "finished", "prepared",
                 "behind")

    def __init__(self, hub: Membership, gen_id: str, after: ev.StreamId | None,
                 view: View[T], channel: Channel | None = None):
        self.hub = hub
        self.gen_id = gen_id
        self.view = view
        self.last = after  # id of the last event handed out (or the client's Last-Event-ID)
        self.pos: int | None = None  # absolute index in the channel of the next event
        self.channel = channel  # our hub registration (given when the caller joined for us)
        self.finished = False  # the terminal event was handed out
        self.prepared = False  # view.prepare(channel) was awaited
        self.behind: Callable[[list[ev.Event]], T] | None = None  # while reading from Redis

    async def open(self) -> None:
        """Join the hub's channel of the stream (loading its tail if we are the first)."""
        if self.channel is None:
            self.channel = await self.hub.join(self.gen_id)

    async def next(self, conn: Connection) -> T | None:
        """The next batch; ``view.empty`` when woken with nothing new; None after the terminal."""
        while True:
            got = self._step()
            if got is _NOTHING_NEW:
                if conn.closing or conn.draining or conn.ping_due:
                    return self.view.empty
                channel, pos = self.channel, self.pos
                assert channel is not None and pos is not None
                future = conn.waiter()
                channel.park(future)
                await future
                # Draining (SIGTERM): hand back at once, so an idle stream ends with its hint too.
                if conn.closing or conn.draining or (conn.ping_due and channel.end <= pos):
                    return self.view.empty
            elif got is _SETUP:
                await self._setup()
            elif got is _REDIS:
                return await self._from_redis()
            else:
                return got

    def poll(self, conn: Connection, pushed: Pushed) -> T | None | Need:
        """``next`` without waiting, for a viewer served from the channel's notify: the next
        batch, or ``view.empty`` with ``pushed`` parked on the channel (or its connection
        closing, draining, or due a ping), or NEED when only ``fetch`` can go on (joining,
        or reading from Redis behind the channel's memory)."""
        got = self._step()
        if got is _NOTHING_NEW:
            if not (conn.closing or conn.draining or conn.ping_due):
                assert self.channel is not None
                self.channel.park_pushed(pushed)
            return self.view.empty
        if got is _SETUP or got is _REDIS:
            return NEED
        return got

    async def fetch(self) -> T | None:
        """What ``poll`` could not do without waiting: join, prepare, or read a page from
        Redis. Returns a batch (``view.empty`` if none yet), or None after the terminal."""
        got = self._step()
        if got is _SETUP:
            await self._setup()
            got = self._step()
        if got is _REDIS:
            return await self._from_redis()
        return self.view.empty if got is _NOTHING_NEW or got is _SETUP else got

    async def _setup(self) -> None:
        if self.channel is None:
            self.channel = await self.hub.join(self.gen_id)
        if not self.prepared:
            await self.view.prepare(self.channel, self.hub)
            self.prepared = True

    def _step(self) -> T | None | _Need:
        """The next batch from the channel's memory if it has one, else what it takes."""
        if self.finished:
            return None
        channel = self.channel
        if channel is None or not self.prepared:
            return _SETUP
        while True:
            pos, base = self.pos, channel.base
            if pos is None or pos < base:
                pos = self.pos = channel.position_after(self.last)
                if pos is None:
                    return _REDIS
                self.behind = None  # back in the channel's memory
            # Indexes into the channel's lists read inline (not end/id_at): once or twice
            # per viewer and event in a fan-out.
            if pos < base + len(channel.events):
                ids = channel.ids
                last = self.last
                if last is not None and ids[pos - base] <= last:
                    # We are past what the channel holds here (a Redis read ran ahead of
                    # the hub): re-seek by id instead of handing anything out twice.
                    self.pos = channel.position_after(last)
                    continue
                batch, stop, terminal = self.view.take(channel, pos)
                self.pos = stop
                self.last = ids[stop - 1 - base]
                self.finished = terminal
                return batch
            if channel.terminal_at is not None:  # resumed past the terminal: nothing more
                self.finished = True
                return None
            if channel.failed is not None:
                raise channel.failed
            return _NOTHING_NEW

    async def _from_redis(self) -> T | None:
        """The next page after ``last`` straight from Redis (memory no longer has it)."""
        behind = self.behind
        if behind is None:
            behind = self.behind = await self.view.catch_up(self.hub, self.gen_id, self.last)
        events = await self.hub.read_after(self.gen_id, self.last)
        if not events:
            self.finished = True  # the stream expired under us; nothing more to hand out
            return None
        self.last = ev.parse_id(events[-1].id)
        self.pos = None  # re-seek in the channel by id next time
        self.finished = any(event.terminal for event in events)
        return behind(events)

    async def aclose(self) -> None:
        if self.channel is not None:
            self.hub.leave(self.channel)
            self.channel = None


async def events_after(
    hub: Membership, gen_id: str, after: ev.StreamId | None
) -> AsyncIterator[ev.Event]:
    """The typed events of ``gen_id`` after ``after``, live, until the terminal one.

    For in-process consumers (the OpenAI facade). Close it (``aclosing``) to
    leave the hub at once.
    """
    viewer = Viewer(hub, gen_id, after, EVENTS)
    loop = asyncio.get_running_loop()
    conn = Connection(loop, None, loop.time(), gen_id)
    try:
        await viewer.open()
        while (batch := await viewer.next(conn)) is not None:
            for event in batch:
                yield event
    finally:
        await viewer.aclose()
