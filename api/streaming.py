"""What one SSE viewer receives (replay after its last id, then live, then the end), and
the route that serves it.

A :class:`Viewer` is the frame source of one connection (see ``api.sse``). Its
position is an index into its hub channel; when the part it needs has left the
channel's memory (or the channel has not reached it yet) it re-seeks by event
id, reading from Redis what memory no longer holds. Every switch goes by id, so
the seam has no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenrelay.api.deps import AppState, generation_id, get_reader
from tokenrelay.api.hub import Channel, Hub
from tokenrelay.api.sse import Connection, EventStreamResponse
from tokenrelay.shared import events as ev
from tokenrelay.shared import streams
from tokenrelay.shared.errors import TokenRelayError

REDIS_PAGE = 500


class Viewer:
    """The frames of ``gen_id`` after ``after`` for one connection, in chunks."""

    __slots__ = ("hub", "redis", "gen_id", "last", "pos", "channel", "finished")

    def __init__(self, hub: Hub, redis: Redis, gen_id: str, after: ev.StreamId | None,
                 channel: Channel | None = None):
        self.hub = hub
        self.redis = redis
        self.gen_id = gen_id
        self.last = after  # id of the last event sent (or the client's Last-Event-ID)
        self.pos: int | None = None  # absolute index in the channel of the next frame to send
        self.channel = channel  # our hub registration (given when the caller joined for us)
        self.finished = False  # the terminal frame was handed out

    async def open(self) -> None:
        """Join the hub's channel of the stream (loading its tail if we are the first)."""
        if self.channel is None:
            self.channel = await self.hub.join(self.gen_id)

    async def next(self, conn: Connection) -> bytes | None:
        """The next chunk to write; b"" when woken with nothing new; None after the terminal."""
        if self.finished:
            return None
        channel = self.channel
        if channel is None:
            channel = self.channel = await self.hub.join(self.gen_id)
        while True:
            pos = self.pos
            if pos is None or pos < channel.base:
                pos = self.pos = channel.position_after(self.last)
                if pos is None:
                    return await self._from_redis()
            if pos < channel.end:
                last = self.last
                if last is not None and channel.id_at(pos) <= last:
                    # We are past what the channel holds here (a Redis read ran ahead of
                    # the hub): re-seek by id instead of sending anything twice.
                    self.pos = channel.position_after(last)
                    continue
                chunk, stop, terminal = channel.take(pos)
                self.pos = stop
                self.last = channel.id_at(stop - 1)
                self.finished = terminal
                return chunk
            if channel.failed is not None:
                raise channel.failed
            if conn.closing or conn.draining or conn.ping_due:
                return b""
            future = conn.waiter()
            channel.park(future)
            await future
            # Draining (SIGTERM): hand back at once, so an idle stream ends with its hint too.
            if conn.closing or conn.draining or (conn.ping_due and channel.end <= pos):
                return b""

    async def _from_redis(self) -> bytes | None:
        """The next page after ``last`` straight from Redis (memory no longer has it)."""
        start = None if self.last is None else ev.format_id(self.last)
        self.hub.catchup_reads += 1
        entries = await streams.read_after(self.redis, self.gen_id, start, REDIS_PAGE)
        if not entries:
            self.finished = True  # the stream expired under us; nothing more to send
            return None
        frames = [ev.frame_of_entry(eid, fields) for eid, fields in entries]
        self.last = ev.parse_id(frames[-1][0])
        self.pos = None  # re-seek in the channel by id next time
        self.finished = any(etype in ev.TERMINAL_TYPES for _, etype, _ in frames)
        return b"".join(frame for _, _, frame in frames)

    async def aclose(self) -> None:
        if self.channel is not None:
            self.hub.leave(self.channel)
            self.channel = None


async def viewer_frames(
    hub: Hub, redis: Redis, gen_id: str, after: ev.StreamId | None
) -> AsyncIterator[bytes]:
    """The same bytes as an async iterator (``retry:`` first), for in-process consumers.

    Close it (``aclosing``) to leave the hub at once.
    """
    viewer = Viewer(hub, redis, gen_id, after)
    loop = asyncio.get_running_loop()
    conn = Connection(loop, None, loop.time(), gen_id)
    try:
        await viewer.open()
        yield ev.RETRY_FRAME
        while (chunk := await viewer.next(conn)) is not None:
            if chunk:
                yield chunk
    finally:
        await viewer.aclose()


_EVENTS_PATH = re.compile(r"^/v1/generations/([^/]+)/events$")


def _events_id(path: str) -> str | None:
    match = _EVENTS_PATH.match(path)
    return None if match is None else match[1]


class EventsFastPath:
    """ASGI middleware that serves ``GET /v1/generations/{id}/events`` below the router.

    Why: an SSE viewer lives for minutes, and every layer between uvicorn and the
    response stays suspended for as long, with its frames, exit stacks and send
    wrapper. Through FastAPI's router an idle viewer held ~23 KiB; from here (the
    innermost middleware) ~14 KiB, and each write crosses two fewer wrappers. The
    checks are the route's own functions (id, credentials, ``Last-Event-ID``,
    authorisation, viewer limit). Anything that fails them is handed to the router,
    which answers it again with the one error mapping, so errors look the same.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        # Imported here: api.generations imports this module.
        from tokenrelay.api import generations

        self._generations = generations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = None
        if scope["type"] == "http" and scope["method"] == "GET":
            # (Nothing held in this frame but what the stream needs: it lives as long.)
            raw_id = _events_id(scope["path"])
            if raw_id is not None:
                response = await self._open(scope, raw_id)
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    async def _open(self, scope: Scope, raw_id: str) -> EventStreamResponse | None:
        generations = self._generations
        request = Request(scope)
        state: AppState = scope["app"].state.tr
        try:
            gen_id = await generation_id(raw_id)
            who = await get_reader(request, state, request.query_params.get("token"))
            after = generations.parse_after(request.headers.get("last-event-id"),
                                            request.query_params.get("after"))
            response: EventStreamResponse = await generations.open_event_stream(
                state, who, gen_id, after)
        except (TokenRelayError, RedisError, OSError):
            return None  # the router answers it, with the error mapping of every route
        return response
