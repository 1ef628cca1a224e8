"""A fold: a wire protocol whose frame for an event depends on the events before it.

Responses' sequence numbers and the AI SDK's open parts are such protocols. A fold's
frames are computed once per event per process, like an encoding's (see
:mod:`tokenrelay.api.channel`), from one state per channel folded over the stream from
its first event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from tokenrelay.api.channel import CHUNK_FRAMES, Channel, Membership, _Frames
from tokenrelay.shared import events as ev

S = TypeVar("S")


class _Folded(_Frames, Generic[S]):
    """A fold's frames of a channel's events and its state after the last of them."""

    __slots__ = ("state", "step")

    def __init__(self, state: S, step: Callable[[S, ev.Event], bytes]):
        super().__init__()
        self.state = state
        self.step = step

    def fill(self, events: list[ev.Event], upto: int) -> None:
        """Fold ``events[len(items):upto]`` (relative to the channel's base) into frames."""
        items, step, state = self.items, self.step, self.state
        for event in events[len(items) : upto]:
            items.append(step(state, event))

    def trim(self, events: list[ev.Event], drop: int) -> None:
        self.fill(events, drop)  # the state must pass every event, read by a viewer or not
        del self.items[:drop]


class Fold(Generic[S]):
    """A wire protocol whose frame for an event depends on the events before it
    (sequence numbers, which parts are open). Its frames are computed once per event per
    process, like an Encoding's, from a state folded over the stream from its first event.

    ``start()`` makes the state of an empty stream; ``step(state, event)`` mutates it and
    returns the event's frame (``b""`` for none). ``step`` must be a function of the state
    and the event alone, so that every fold of the same stream gives the same frames.

    Per channel, one state and the frames of the events the channel holds (trimmed with
    them: memory is the channel's cap times a frame, plus one state). When the channel
    holds only a tail, :meth:`prepare` first folds the events before it from Redis (once
    per channel, shared by concurrent viewers). A viewer behind the channel's memory folds
    a private state from Redis up to its position (:meth:`catch_up`: one read of the
    stream's prefix per time it falls behind), so its frames are the same.
    """

    __slots__ = ("name", "start", "step")
    empty = b""

    def __init__(self, name: str, start: Callable[[], S], step: Callable[[S, ev.Event], bytes]):
        self.name = name
        self.start = start
        self.step = step

    async def prepare(self, channel: Channel, hub: Membership) -> None:
        while self not in channel.frames:
            priming = channel.priming.get(self)
            if priming is None:
                priming = channel.priming[self] = asyncio.ensure_future(
                    self._prime(channel, hub))
                priming.add_done_callback(lambda done: _settle(channel, self, done))
            await asyncio.shield(priming)

    async def _prime(self, channel: Channel, hub: Membership) -> None:
        """Fold every event before the channel's first one (read from Redis), then hold it."""
        state, after = self.start(), None
        while not channel.head_complete:
            page = await hub.read_after(channel.gen_id, after)
            # The head is re-read after every await: the channel may have trimmed meanwhile.
            head = channel.ids[0] if channel.ids else _after(ev.parse_id(channel.cursor))
            todo = [event for event in page if ev.parse_id(event.id) < head]
            for event in todo:
                self.step(state, event)
            if not page or len(todo) < len(page):
                break  # at the channel's first event (or the stream is gone from Redis)
            after = ev.parse_id(page[-1].id)
        channel.frames[self] = _Folded(state, self.step)

    def take(self, channel: Channel, pos: int) -> tuple[bytes, int, bool]:
        folded = channel.frames.get(self)
        if not isinstance(folded, _Folded):
            raise RuntimeError(f"{self!r} was not prepared for generation {channel.gen_id}")
        stop = min(channel.end, pos + CHUNK_FRAMES)
        folded.fill(channel.events, stop - channel.base)
        return folded.hand_out(channel, pos, stop)

    async def catch_up(self, hub: Membership, gen_id: str,
                       last: ev.StreamId | None) -> Callable[[list[ev.Event]], bytes]:
        state, step = self.start(), self.step
        after: ev.StreamId | None = None
        while last is not None and after != last:
            page = await hub.read_after(gen_id, after)
            todo = [event for event in page if ev.parse_id(event.id) <= last]
            for event in todo:
                step(state, event)
            if not page or len(todo) < len(page):
                break
            after = ev.parse_id(page[-1].id)

        def frames(events: list[ev.Event]) -> bytes:
            return b"".join([step(state, event) for event in events])

        return frames

    def __repr__(self) -> str:
        return f"Fold({self.name!r})"


def _after(sid: ev.StreamId) -> ev.StreamId:
    return sid[0], sid[1] + 1


def _settle(channel: Channel, fold: object, done: asyncio.Future[None]) -> None:
    """A priming ended: forget it (a failed one is retried by the next viewer)."""
    if channel.priming.get(fold) is done:
        del channel.priming[fold]
    if not done.cancelled():
        done.exception()  # retrieved: its waiters got it; nobody else must be told
