"""The SSE response: pre-encoded bytes to the socket, heartbeats, send timeout, disconnects.

Why not sse-starlette: it starts four tasks per connection (stream, ping, exit
signal, disconnect), encodes every event per connection, and holds ~41 KiB per
idle viewer; at 1,000 viewers of one stream its per-event path was the
bottleneck. Here a connection is its own ASGI task plus one small task parked on
``receive()`` (the only way ASGI tells us about a disconnect). Everything timed
— heartbeats and stalled sends — is checked by one ticker per process over all
connections (:class:`Connections`), so no timer is armed per event.

    ASGI task:  start ─ retry ─┬─ source.next(conn) ─▶ bytes ─ send ─┐
                               │   (waits on conn.wake)              │
                               └──────────────◀──────────────────────┘
                               None (terminal sent) ─▶ last send, done
    watcher:    receive() ─▶ http.disconnect ─▶ conn.disconnected, wake
    ticker:     idle ≥ heartbeat ─▶ ping due, wake;  send > timeout ─▶ cancel task

Under ``tokenrelay api`` (whose HTTP protocol offers ``TAKE_OVER``) the ASGI task
ends after the retry line: the stream becomes a :class:`DirectStream`, which the
channel's notify, the ticker and the protocol call, and which writes chunked
frames to the transport itself. An idle viewer then holds no task and no
suspended middleware frame, and a write is one call from the channel's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from tokenrelay.api.protocol import TAKE_OVER, Line, reset_connection

if TYPE_CHECKING:
    from tokenrelay.api.channel import Pushed

logger = logging.getLogger(__name__)

# A comment line alone: no blank line after it, so that lax SSE parsers (httpx-sse,
# the openai SDK's) do not turn it into an event with empty data.
PING = b": ping\n"
# Written to every open stream when the process shuts down: reconnect soon (to
# another instance, with Last-Event-ID) instead of waiting for the socket to drop.
# No blank line after it: an SSE parser applies ``retry:`` as it reads the line, and a
# blank line would make lax ones (httpx-sse, fetch-event-source) yield an empty event.
DRAIN = b": shutting down, reconnect\nretry: 250\n"
MEDIA_TYPE = b"text/event-stream; charset=utf-8"
_HEADERS = (
    (b"content-type", MEDIA_TYPE),
    (b"cache-control", b"no-store"),  # neither browsers nor proxies may keep the stream
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer it either
)


class Connection:
    """One SSE connection as the ticker and the frame source see it."""

    __slots__ = ("loop", "task", "wake_future", "last_write", "send_started", "ping_due",
                 "disconnected", "stalled", "draining", "label")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object] | None,
                 now: float, label: str):
        self.loop = loop  # kept: asyncio.get_running_loop() costs a getpid() syscall per call
        self.task = task
        self.wake_future: asyncio.Future[None] | None = None
        self.last_write = now
        self.send_started = 0.0  # loop time a send began; 0 when not sending
        self.ping_due = False
        self.disconnected = False
        self.stalled = False
        self.draining = False  # the process is shutting down: end with DRAIN
        self.label = label

    def waiter(self) -> asyncio.Future[None]:
        """A fresh future that ``wake`` resolves; the frame source parks on it."""
        future = self.wake_future = self.loop.create_future()
        return future

    def wake(self) -> None:
        future = self.wake_future
        if future is not None and not future.done():
            future.set_result(None)

    @property
    def closing(self) -> bool:
        return self.disconnected or self.stalled

    def cut(self) -> None:
        """Stop a connection that made no write progress for the send timeout: cancel its
        task, and wake one without a task of its own (a taken-over WebSocket)."""
        if self.task is not None:
            self.task.cancel()
        self.wake()


class Need(enum.Enum):
    """A frame source's answer to ``poll`` when only its asynchronous ``fetch`` can go on."""

    FETCH = "fetch"


NEED = Need.FETCH


class FrameSource(Protocol):
    async def open(self) -> None:
        """Register (with the hub) before the headers go out; may raise to fail the request."""

    async def next(self, conn: Connection) -> bytes | None:
        """Bytes to write (b"" when woken with nothing new), or None after the last frame."""

    def poll(self, conn: Connection, pushed: Pushed) -> bytes | None | Need:
        """``next`` without waiting: b"" with ``pushed`` parked (woken at the next append),
        or NEED when only ``fetch`` can go on."""

    async def fetch(self) -> bytes | None:
        """What ``poll`` needed (joining, a page from Redis): bytes (maybe b""), or None."""

    async def aclose(self) -> None:
        """Release what the source holds (hub registration); called exactly once."""


class Connections:
    """All open SSE connections of a process, and the one ticker that times them."""

    def __init__(self, heartbeat_s: float, send_timeout_s: float):
        self.heartbeat_s = heartbeat_s
        self.send_timeout_s = send_timeout_s
        self.tick_s = max(0.02, min(1.0, heartbeat_s / 4, send_timeout_s / 4))
        self.open: set[Connection] = set()
        self.stalled_total = 0  # connections closed by the send timeout, for metrics and tests
        self._task: asyncio.Task[None] | None = None
        self._gc_before: tuple[int, int, int] = gc.get_threshold()

    def __len__(self) -> int:
        return len(self.open)

    def start(self) -> None:
        if self._task is None:
            self._gc_before = tune_gc()
            self._task = asyncio.create_task(self._tick(), name="tr-sse-ticker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            # Streams still open when the server stops (past its graceful timeout): uvicorn
            # cancels the ASGI ones' tasks, which closes their connections; close the others.
            for conn in list(self.open):
                if isinstance(conn, DirectStream):
                    conn.close()
            gc.unfreeze()
            gc.set_threshold(*self._gc_before)

    def drain(self) -> None:
        """End every open stream with a reconnect hint (SIGTERM: the process is leaving)."""
        for conn in list(self.open):  # a stream served in place leaves the set as it ends
            conn.draining = True
            conn.wake()

    def check(self, now: float) -> None:
        """Mark pings due and cut stalled connections; run by the ticker every ``tick_s``."""
        for conn in list(self.open):  # a stream served in place leaves the set as it ends
            if conn.send_started:
                if now - conn.send_started >= self.send_timeout_s and not conn.stalled:
                    conn.stalled = True
                    self.stalled_total += 1
                    logger.warning("closing stalled viewer generation_id=%s: no write "
                                   "progress for %.1fs", conn.label, now - conn.send_started)
                    conn.cut()
            elif now - conn.last_write >= self.heartbeat_s and not conn.ping_due:
                conn.ping_due = True
                conn.wake()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            self.check(loop.time())


# The cyclic GC's thresholds in a process that holds thousands of connections.
GC_THRESHOLDS = (10_000, 50, 100)


def tune_gc() -> tuple[int, int, int]:
    """Keep the cyclic GC from pausing every stream of the process.

    Each open connection is a few dozen long-lived objects, and every write
    allocates a few more (coroutines, a message dict). With CPython's default
    thresholds (700, 10, 10) a process with 3,000 viewers ran a full collection
    every second or two, each 60–200 ms long and collecting nothing, and every
    viewer's latency took the pause. Objects that exist at start-up (modules, the
    app) are frozen out of the GC's sight, and the thresholds are raised so that
    full collections become rare; garbage without cycles is freed by reference
    counting as always, and cycles still go at the next (rarer) collection.
    Returns the thresholds it replaced (``Connections.stop`` puts them back).
    """
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return before


class EventStreamResponse(Response):
    """A ``text/event-stream`` ASGI response fed by a :class:`FrameSource` of encoded frames.

    ``preamble`` (the ``retry:`` line) is written with the headers. The source's
    bytes are written as they come, one send per batch; after the source ends the
    response ends. Headers: ``Cache-Control: no-store`` and ``X-Accel-Buffering:
    no`` so that proxies neither cache nor buffer the stream.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        source: FrameSource,
        connections: Connections,
        *,
        preamble: bytes,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        label: str = "",
    ):
        self.source = source
        self.connections = connections
        self.preamble = preamble
        self.status_code = status_code
        self.label = label
        raw = [*_HEADERS]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in (headers or {}).items()]
        self.raw_headers = raw
        self.background: BackgroundTask | None = None  # FastAPI may attach one

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "HEAD":
            await self.source.aclose()
            await send(self._start())
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self.source.open()  # an error here is still an ordinary error response
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        conn = Connection(loop, task, loop.time(), self.label)
        watcher = asyncio.create_task(_watch_disconnect(receive, conn), name="tr-sse-watch")
        self.connections.open.add(conn)
        taken = False
        try:
            # The start message is built in the call, so that nothing keeps it (and the
            # header lists middleware add to it) for the minutes the stream lasts.
            await _send_timed(send, self._start(), conn, loop)
            await _send_timed(send, {"type": "http.response.body", "body": self.preamble,
                                     "more_body": True}, conn, loop)
            taken = not conn.closing and self._take_over(scope, conn)
            if not taken:
                await self._pump(send, conn, loop)
        except asyncio.CancelledError:
            # Our own cancel (stalled viewer) or a disconnect seen mid-send: end quietly.
            # Any other cancellation (server shutdown) propagates.
            if not conn.closing or task is None:
                raise
            task.uncancel()
            if conn.stalled:  # the peer stopped reading: drop it, don't wait for it to drain
                reset_connection(scope)
        finally:
            self.connections.open.discard(conn)
            watcher.cancel()
            if not taken:
                await self.source.aclose()
        if self.background is not None and not taken:
            await self.background()

    def _take_over(self, scope: Scope, conn: Connection) -> bool:
        """Hand the stream to a :class:`DirectStream` if the server offers its connection
        (``tokenrelay api``); the ASGI call then returns, and with it every frame of the
        middleware chain and the task. Elsewhere (False) the stream goes on through ASGI."""
        offer = scope.get("extensions", {}).get(TAKE_OVER)
        if offer is None:
            return False
        stream = DirectStream(conn.loop, self.label, self.source, self.connections,
                              self.background)
        line: Line | None = offer["take_over"](scope, stream)
        if line is None:
            return False
        stream.start(line, draining=conn.draining)
        return True

    def _start(self) -> Message:
        headers, self.raw_headers = self.raw_headers, []  # sent once; not kept after
        return {"type": "http.response.start", "status": self.status_code, "headers": headers}

    async def _pump(self, send: Send, conn: Connection,
                    loop: asyncio.AbstractEventLoop) -> None:
        """Write what the source hands out until it ends; the hot path of every viewer.

        ``send_started`` flags a write in progress so that the ticker can cut one
        that never returns (a stalled client); no timer is armed per write.
        """
        source = self.source
        while True:
            chunk = await source.next(conn)
            if conn.closing:
                return
            if conn.draining:
                conn.send_started = loop.time()
                await send({"type": "http.response.body", "body": chunk + DRAIN if chunk else DRAIN,
                            "more_body": False})
                return
            if chunk is None:
                conn.send_started = loop.time()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if not chunk:
                if not conn.ping_due:
                    continue
                chunk = PING
            conn.ping_due = False
            conn.send_started = now = loop.time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            conn.send_started = 0.0
            conn.last_write = now


async def _send_timed(send: Send, message: Message, conn: Connection,
                      loop: asyncio.AbstractEventLoop) -> None:
    """Send, flagged as in progress so that the ticker can cut a send that never returns."""
    conn.send_started = now = loop.time()
    await send(message)
    conn.send_started = 0.0
    conn.last_write = now


async def _watch_disconnect(receive: Receive, conn: Connection) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            conn.disconnected = True
            conn.wake()
            return



class DirectStream(Connection):
    """An SSE stream that took its connection over: frames go straight to the transport.

    No task and no ASGI call stay behind it: the channel's notify calls ``wake`` (as
    do the ticker for a heartbeat and ``Connections.drain``), and ``pump`` writes
    what the source holds in HTTP/1.1 chunked framing, in the loop over the
    channel's pushed viewers, until the source has nothing new (it is parked again)
    or the transport's buffer passes its high-water mark (``pause_writing``; it goes
    on from its position at ``resume_writing``; no progress for the send timeout and
    the ticker resets it, as a stalled ASGI send). A source that must wait (joining,
    reading behind the channel's memory from Redis) gets a task for that ``fetch``
    alone. The end: the terminal frames, the terminating chunk, and the connection
    back to the protocol (keep-alive or close); a disconnect is the protocol's
    ``connection_lost``.
    """

    __slots__ = ("source", "connections", "background", "line", "parked", "paused", "ended")

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str, source: FrameSource,
                 connections: Connections, background: BackgroundTask | None):
        super().__init__(loop, None, loop.time(), label)
        self.source = source
        self.connections = connections
        self.background = background
        self.line: Line | None = None
        self.parked = False  # on its channel's list of pushed viewers
        self.paused = False  # the transport's buffer is over its high-water mark
        self.ended = False

    def start(self, line: Line, *, draining: bool) -> None:
        self.line = line
        self.draining = draining
        self.connections.open.add(self)
        self.pump()

    def pump(self) -> None:
        """Write what the source holds now, until it has nothing new or the buffer is full."""
        source = self.source
        if self.line is None or self.line.transport.is_closing():
            return  # its connection_lost is coming
        try:
            while self.task is None and not self.paused and not self.ended:
                chunk = source.poll(self, self)
                if chunk is NEED:
                    self.task = self.loop.create_task(self._fetch(), name="tr-sse-fetch")
                    return
                if not self._deliver(chunk):
                    return
        except Exception as exc:  # the stream cannot go on (its storage failed)
            self._fail(exc)

    wake = pump  # the channel's notify, the ticker and drain: one call less per write

    def _deliver(self, chunk: bytes | None) -> bool:
        """Write ``chunk`` as ``EventStreamResponse._pump`` sends it; whether to go on."""
        if self.draining:
            self._write_last(chunk + DRAIN if chunk else DRAIN)
            return False
        if chunk is None:
            self._write_last(b"")
            return False
        if not chunk:
            if not self.ping_due:
                # Parked (the next append wakes it), or events without frames: go on.
                return not self.parked
            chunk = PING
        self.ping_due = False
        assert self.line is not None
        self.line.transport.write(_chunked(chunk))
        self.last_write = self.loop.time()
        return True

    async def _fetch(self) -> None:
        try:
            chunk = await self.source.fetch()
        except Exception as exc:
            self.task = None
            self._fail(exc)
            return
        self.task = None
        if self.ended:
            return
        if self._deliver(chunk):
            self.pump()

    def _write_last(self, chunk: bytes) -> None:
        assert self.line is not None
        self.line.transport.write(_chunked(chunk) + b"0\r\n\r\n" if chunk else b"0\r\n\r\n")
        line = self.line
        self._end()
        line.release()

    # What the protocol tells it.

    def connection_lost(self) -> None:
        self.disconnected = True
        self._end()

    def pause_writing(self) -> None:
        self.paused = True
        self.send_started = self.loop.time()

    def resume_writing(self) -> None:
        self.paused = False
        self.send_started = 0.0
        self.last_write = self.loop.time()
        self.pump()

    def cut(self) -> None:
        """Stalled (no write progress for the send timeout): reset the connection."""
        if self.line is not None:
            self.line.reset()
        self._end()

    def close(self) -> None:
        """Close the connection mid-stream (the stream cannot go on, or the server stops)."""
        if self.line is not None:
            self.line.transport.close()
        self._end()

    def _fail(self, exc: Exception) -> None:
        logger.error("event stream failed generation_id=%s", self.label, exc_info=exc)
        self.close()

    def _end(self) -> None:
        """Leave: no more writes; the source's registration goes in a task of its own."""
        if self.ended:
            return
        self.ended = True
        self.parked = False  # its channel drops it from its list
        self.line = None
        self.connections.open.discard(self)
        fetching, self.task = self.task, None
        self.task = self.loop.create_task(self._close(fetching), name="tr-sse-close")

    async def _close(self, fetching: asyncio.Task[object] | None) -> None:
        if fetching is not None:
            fetching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetching
        await self.source.aclose()
        if self.background is not None:
            await self.background()


class _Chunked:
    """HTTP/1.1 chunked framing of a body, kept for the next call with the same bytes: the
    viewers of a channel at the same position write one shared chunk in turn."""

    __slots__ = ("body", "framed")

    def __init__(self) -> None:
        self.body = b""
        self.framed = b""

    def __call__(self, body: bytes) -> bytes:
        if body is not self.body:
            self.framed = b"%x\r\n%b\r\n" % (len(body), body)
            self.body = body
        return self.framed


_chunked = _Chunked()
