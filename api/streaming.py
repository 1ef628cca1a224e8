"""What one SSE viewer receives: replay after its last id, then live, then the end.

The viewer's position is an index into its hub channel; when the part it needs
has left the channel's memory it reads that part from Redis first. Events are
filtered by id at every switch, so the seam has no gap and no duplicate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from redis.asyncio import Redis

from api.hub import Channel, Hub
from shared import events as ev
from shared import streams

REDIS_PAGE = 500


async def viewer_frames(
    hub: Hub, redis: Redis, gen_id: str, after: ev.StreamId | None
) -> AsyncIterator[bytes]:
    """SSE bytes for one viewer of ``gen_id``, starting after ``after``."""
    yield ev.RETRY_FRAME
    channel = await hub.join(gen_id)
    try:
        async for chunk in _follow(channel, redis, gen_id, after):
            yield chunk
    finally:
        hub.leave(channel)


async def _follow(
    channel: Channel, redis: Redis, gen_id: str, last: ev.StreamId | None
) -> AsyncIterator[bytes]:
    while True:
        pos = channel.position_after(last)
        if pos is None:
            # What this viewer needs next has left the hub's memory: read it from Redis.
            start = None if last is None else ev.format_id(last)
            entries = await streams.read_after(redis, gen_id, start, REDIS_PAGE)
            if not entries:
                return  # the stream expired under us; nothing more to send
            frames = [ev.frame_of_entry(eid, fields) for eid, fields in entries]
            last = ev.parse_id(frames[-1][0])
            yield b"".join(frame for _, _, frame in frames)
            if any(etype in ev.TERMINAL_TYPES for _, etype, _ in frames):
                return
            continue
        while True:
            if pos < channel.base:
                break  # trimmed while we were away: back to Redis
            if pos < channel.end:
                if last is not None and channel.id_at(pos) <= last:
                    break  # channel behind what we already sent: re-seek by id
                chunk, pos, terminal = channel.take(pos)
                last = channel.id_at(pos - 1)
                yield chunk
                if terminal:
                    return
                continue
            if channel.failed is not None:
                raise channel.failed
            await channel.wait_beyond(pos)
