"""Channels and viewers (api.channel) in memory: typed events, frames encoded once per
protocol, positions that survive trimming, and the seam with Redis by event id."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tokenrelay.api.channel import (
    CHUNK_BYTES,
    EVENTS,
    SSE,
    Channel,
    Encoding,
    Entry,
    Viewer,
    events_after,
)
from tokenrelay.api.sse import Connection
from tokenrelay.shared import events as ev


def entry(n: int, event_type: str = ev.DELTA, **data: Any) -> Entry:
    """Stream entry number ``n`` as redis-py returns it (bytes), with id ``1-n``."""
    fields = ev.entry_fields(event_type, data or {"content": f" w{n}"})
    return f"1-{n}".encode(), {k.encode(): v.encode() for k, v in fields.items()}


class Hub:
    """The viewers' side of a hub: one channel, and a 'Redis' that holds every entry."""

    def __init__(self, channel: Channel, stored: list[Entry], page: int = 3):
        self.channel = channel
        self.stored = stored
        self.page = page
        self.reads: list[ev.StreamId | None] = []
        self.left = 0

    async def join(self, gen_id: str) -> Channel:
        self.channel.viewers += 1
        return self.channel

    def leave(self, channel: Channel) -> None:
        channel.viewers -= 1
        self.left += 1

    async def read_after(self, gen_id: str, after: ev.StreamId | None) -> list[ev.Event]:
        self.reads.append(after)
        events = [ev.decode_entry(*e) for e in self.stored]
        return [e for e in events if after is None or ev.parse_id(e.id) > after][: self.page]


def connection() -> Connection:
    loop = asyncio.get_running_loop()
    return Connection(loop, None, loop.time(), "gen")


async def drain(viewer: Viewer[Any], within: float = 5.0) -> list[Any]:
    """Every batch the viewer hands out until its end (it must not wait for more)."""
    conn, batches = connection(), []
    async with asyncio.timeout(within):
        while (batch := await viewer.next(conn)) is not None:
            batches.append(batch)
    return batches


async def test_append_decodes_typed_events_once_and_keeps_the_stored_json() -> None:
    """Appended entries become typed events in order; the terminal one marks the channel done."""
    channel = Channel("gen", 100)
    channel.append([entry(0, ev.STATUS, status="queued"), entry(1), entry(2, ev.DONE)])
    assert [e.type for e in channel.events] == ["status", "delta", "done"]
    assert channel.events[1].data == {"content": " w1"}
    assert channel.events[1].data_json == '{"content":" w1"}'
    assert channel.cursor == "1-2" and channel.done and not channel.active


async def test_each_encoding_encodes_an_event_once_for_all_its_viewers() -> None:
    """A hundred viewers of two protocols: every event is encoded once per protocol."""
    calls: list[str] = []

    def shout(event: ev.Event) -> bytes:
        calls.append(event.id)
        return event.type.upper().encode()

    loud = Encoding("loud", shout)
    channel = Channel("gen", 100)
    channel.append([entry(n) for n in range(5)] + [entry(5, ev.DONE)])
    hub = Hub(channel, [])
    sse = [Viewer(hub, "gen", None, SSE, channel) for _ in range(50)]
    shouted = [Viewer(hub, "gen", None, loud, channel) for _ in range(50)]
    sse_chunks = [await drain(v) for v in sse]
    loud_chunks = [await drain(v) for v in shouted]
    assert calls == [f"1-{n}" for n in range(6)]
    assert loud_chunks[0] == [b"DELTA" * 5 + b"DONE"]
    assert sse_chunks[0] == [b"".join(ev.encode_event(e) for e in channel.events)]
    assert all(c[0] is sse_chunks[0][0] for c in sse_chunks)  # one joined chunk, shared


async def test_a_hand_out_is_capped_in_bytes_not_only_in_frames() -> None:
    """Large events: no chunk is over CHUNK_BYTES unless it is a single larger frame, and
    the chunks together are every frame once, in order."""
    sizes = [30_000, 30_000, 30_000, 200_000, 10, 10]
    channel = Channel("gen", 100)
    channel.append([entry(n, content="x" * size) for n, size in enumerate(sizes)]
                   + [entry(len(sizes), ev.DONE)])
    chunks = await drain(Viewer(Hub(channel, []), "gen", None, SSE, channel))
    assert b"".join(chunks) == b"".join(ev.encode_event(e) for e in channel.events)
    assert len(chunks) == 4  # 2 x 30 KB, 30 KB alone, 200 KB alone, the small rest
    assert all(len(c) <= CHUNK_BYTES or c.count(b"event: ") == 1 for c in chunks)


async def test_typed_and_sse_viewers_see_the_same_events() -> None:
    """The typed view and the SSE frames of one channel carry the same events, in order."""
    channel = Channel("gen", 100)
    channel.append([entry(0, ev.STATUS, status="queued"), entry(1), entry(2, ev.DONE)])
    hub = Hub(channel, [])
    typed = [e for batch in await drain(Viewer(hub, "gen", None, EVENTS, channel))
             for e in batch]
    frames = b"".join(await drain(Viewer(hub, "gen", None, SSE, channel)))
    assert typed == channel.events
    assert ev.parse_sse(frames.decode()) == typed


async def test_a_viewer_resumes_strictly_after_its_last_event_id() -> None:
    """Last-Event-ID semantics: a viewer given an id gets only what comes after it."""
    channel = Channel("gen", 100)
    channel.append([entry(n) for n in range(4)] + [entry(4, ev.DONE)])
    typed = await drain(Viewer(Hub(channel, []), "gen", (1, 2), EVENTS, channel))
    assert [e.id for batch in typed for e in batch] == ["1-3", "1-4"]


async def test_trimmed_head_is_read_from_redis_then_memory_without_gap_or_duplicate() -> None:
    """A viewer behind the capped memory reads pages from Redis, then re-seeks by id."""
    stored = [entry(n) for n in range(20)] + [entry(20, ev.DONE)]
    channel = Channel("gen", 8)
    channel.append(stored)
    assert channel.base > 0 and not channel.head_complete
    hub = Hub(channel, stored)
    typed = await drain(Viewer(hub, "gen", None, EVENTS, channel))
    ids = [e.id for batch in typed for e in batch]
    assert ids == [f"1-{n}" for n in range(21)]
    assert hub.reads[0] is None and len(hub.reads) >= 2  # it did page through Redis


async def test_a_redis_read_ahead_of_the_channel_is_not_handed_out_twice() -> None:
    """Events a viewer got from Redis before the hub read them are skipped in the channel."""
    stored = [entry(n) for n in range(6)] + [entry(6, ev.DONE)]
    channel = Channel("gen", 4)
    channel.append(stored[:5])  # trimmed to 1-3, 1-4; the hub has not read 1-5, 1-6 yet
    viewer = Viewer(Hub(channel, stored, page=6), "gen", None, EVENTS, channel)
    conn = connection()
    from_redis = await viewer.next(conn)  # 1-0 .. 1-5: past the channel's end
    parked = asyncio.ensure_future(viewer.next(conn))
    await asyncio.sleep(0)
    assert not parked.done()
    channel.append(stored[5:])  # the hub catches up: 1-5 again, then 1-6
    after = await asyncio.wait_for(parked, 5)
    ids = [e.id for batch in [from_redis, after] for e in batch or []]
    assert ids == [f"1-{n}" for n in range(7)] and viewer.finished


async def test_a_parked_viewer_wakes_on_append_and_on_ping() -> None:
    """A viewer waits for the next append; a due heartbeat wakes it with an empty batch."""
    channel = Channel("gen", 100)
    channel.append([entry(0, ev.STATUS, status="queued")])
    viewer = Viewer(Hub(channel, []), "gen", (1, 0), SSE, channel)
    conn = connection()
    waiting = asyncio.ensure_future(viewer.next(conn))
    await asyncio.sleep(0)
    assert not waiting.done() and channel.parked == 1
    channel.append([entry(1)])
    assert await asyncio.wait_for(waiting, 5) == ev.encode_event(channel.events[1])
    waiting = asyncio.ensure_future(viewer.next(conn))
    await asyncio.sleep(0)
    conn.ping_due = True
    conn.wake()
    assert await asyncio.wait_for(waiting, 5) == b""


async def test_events_after_yields_typed_events_live_and_leaves_when_closed() -> None:
    """The in-process iterator follows the channel live and leaves the hub once closed."""
    channel = Channel("gen", 100)
    channel.append([entry(0, ev.STATUS, status="queued")])
    hub = Hub(channel, [])
    seen: list[ev.Event] = []
    async with contextlib.aclosing(events_after(hub, "gen", None)) as events:
        async for event in events:
            seen.append(event)
            if len(seen) == 1:
                channel.append([entry(1), entry(2, ev.DONE)])
    assert [e.id for e in seen] == ["1-0", "1-1", "1-2"] and seen[-1].terminal
    assert hub.left == 1 and channel.viewers == 0


@pytest.mark.parametrize("cap", [4, 5, 9])
async def test_positions_stay_absolute_across_trims(cap: int) -> None:
    """After any number of trims an absolute position still names the same event."""
    channel = Channel("gen", cap)
    for n in range(30):
        channel.append([entry(n)])
        pos = channel.position_after((1, n - 1))
        assert pos is not None and channel.events[pos - channel.base].id == f"1-{n}"
    assert channel.position_after(None) is None  # the head has left memory
