"""Folds (api.channel.Fold): a protocol whose frame depends on the events before it gets
the frames of a fold from the stream's first event, whatever part of the stream the
channel holds, and computes them once per process for all its viewers."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.api.test_channel import Hub, drain, entry
from tokenrelay.api.channel import Channel, Entry, Viewer
from tokenrelay.api.fold import Fold
from tokenrelay.shared import events as ev


class Counter:
    """A toy protocol: each frame numbers its event and carries the text length so far."""

    def __init__(self) -> None:
        self.steps = 0
        self.fold = Fold("counter", self.start, self.step)

    def start(self) -> dict[str, int]:
        return {"seq": 0, "chars": 0}

    def step(self, state: dict[str, int], event: ev.Event) -> bytes:
        self.steps += 1
        state["chars"] += len(event.data.get("content", ""))
        state["seq"] += 1
        if event.type == ev.STATUS:
            return b""  # an event may produce no frame
        return f"{state['seq']}:{event.id}:{state['chars']}\n".encode()


def stream(n: int) -> list[Entry]:
    """A generation of ``n + 1`` entries: queued, deltas, done."""
    return ([entry(0, ev.STATUS, status="queued")] + [entry(i) for i in range(1, n)]
            + [entry(n, ev.DONE)])


def reference(stored: list[Entry]) -> list[bytes]:
    """Each event's frame from a fresh fold over the whole stream."""
    counter = Counter()
    state = counter.start()
    return [counter.step(state, ev.decode_entry(*e)) for e in stored]


async def feed(channel: Channel, entries: list[Entry], size: int = 3) -> None:
    """The hub's reader: append ``entries`` a few at a time, letting viewers run between."""
    for i in range(0, len(entries), size):
        await asyncio.sleep(0)
        channel.append(entries[i : i + size])


async def test_frames_equal_a_fold_from_the_start_when_the_channel_holds_the_head() -> None:
    stored = stream(30)
    channel = Channel("gen", 1000)
    channel.append(stored)
    hub = Hub(channel, stored)
    got = b"".join(await drain(Viewer(hub, "gen", None, Counter().fold, channel)))
    assert got == b"".join(reference(stored))
    assert hub.reads == []  # the channel held it all: nothing read from Redis


async def test_frames_equal_a_fold_from_the_start_when_the_channel_holds_only_a_tail() -> None:
    """Only a tail in memory (loaded or trimmed): the state is primed from Redis, then
    follows live appends and further trims."""
    stored = stream(40)
    channel = Channel("gen", 8)
    channel.append(stored[:30])
    assert not channel.head_complete and channel.base > 0
    hub = Hub(channel, stored, page=7)
    after = 26  # the client's last event: inside the channel's memory
    viewer = Viewer(hub, "gen", (1, after), Counter().fold, channel)
    got, _ = await asyncio.gather(drain(viewer), feed(channel, stored[30:]))
    assert b"".join(got) == b"".join(reference(stored)[after + 1 :])
    assert hub.reads and hub.reads[0] is None  # primed from the stream's first entry


async def test_a_viewer_behind_the_channels_memory_gets_the_same_frames() -> None:
    """From the start, on a trimmed channel: pages from Redis (a private fold), then the
    channel's shared frames, without a seam."""
    stored = stream(40)
    channel = Channel("gen", 8)
    channel.append(stored[:30])
    hub = Hub(channel, stored, page=5)
    for after in (None, (1, 3)):
        viewer = Viewer(hub, "gen", after, Counter().fold, channel)
        got, _ = await asyncio.gather(drain(viewer), feed(channel, stored[30:] if after is None
                                                          else []))
        skip = 0 if after is None else after[1] + 1
        assert b"".join(got) == b"".join(reference(stored)[skip:])


async def test_the_state_passes_events_trimmed_before_any_viewer_took_them() -> None:
    stored = stream(50)
    channel = Channel("gen", 8)
    channel.append(stored[:2])
    counter = Counter()
    hub = Hub(channel, stored)
    await counter.fold.prepare(channel, hub)  # a viewer joined, then stalled
    for e in stored[2:]:
        channel.append([e])  # many trims, nobody reading
    got = await drain(Viewer(hub, "gen", (1, 45), counter.fold, channel))
    assert b"".join(got) == b"".join(reference(stored)[46:])
    assert counter.steps == len(stored)  # each event folded once, read or not


async def test_many_viewers_share_frames_folded_once() -> None:
    """A hundred viewers, from the head and from a trimmed tail: one step per event."""
    for cap in (1000, 8):
        stored = stream(30)
        channel = Channel("gen", cap)
        channel.append(stored)
        hub = Hub(channel, stored, page=4)
        counter = Counter()
        tail = ev.parse_id(channel.events[0].id)  # every viewer starts inside the memory
        viewers = [Viewer(hub, "gen", tail, counter.fold, channel) for _ in range(100)]
        chunks: list[list[Any]] = await asyncio.gather(*(drain(v) for v in viewers))
        assert counter.steps == len(stored)  # prefix (primed once) + the channel's events
        assert all(c == chunks[0] and c[0] is chunks[0][0] for c in chunks)
        assert b"".join(chunks[0]) == b"".join(reference(stored)[tail[1] + 1 :])


async def test_a_failed_priming_is_retried_by_the_next_viewer() -> None:
    stored = stream(30)
    channel = Channel("gen", 8)
    channel.append(stored)

    class Down(Hub):
        async def read_after(self, gen_id: str, after: ev.StreamId | None) -> list[ev.Event]:
            raise OSError("redis down")

    counter = Counter()
    tail = ev.parse_id(channel.events[0].id)
    try:
        await drain(Viewer(Down(channel, stored), "gen", tail, counter.fold, channel))
    except OSError:
        pass
    else:
        raise AssertionError("the priming's failure must reach the viewer")
    assert not channel.priming and counter.fold not in channel.frames
    got = await drain(Viewer(Hub(channel, stored), "gen", tail, counter.fold, channel))
    assert b"".join(got) == b"".join(reference(stored)[tail[1] + 1 :])
