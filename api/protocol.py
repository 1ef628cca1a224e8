"""The HTTP protocol a bare ``tokenrelay api`` serves with: uvicorn's httptools protocol
plus the limits it lacks, so the API holds without a proxy in front.

uvicorn's httptools protocol has no bound on the size of a request's head and no clock
on a request that arrives slowly: four connections sending unfinished 25 MB headers
grew an API by 140 MB, and slow heads, slow bodies and silent sockets stayed open for
as long as their clients liked. Here a request's head must fit ``REQUEST_HEAD_MAX_BYTES``
(else 431), must be complete ``REQUEST_HEAD_TIMEOUT_S`` after its first byte, or after the
connection opened (else 408), and its body ``REQUEST_BODY_TIMEOUT_S`` after its head (else
the connection closes and the app sees the client gone). Responses, SSE streams included, have no
clock here: they end when the app ends them. Between requests uvicorn's own keep-alive
timeout applies.

It also lets an SSE response take its connection over (``TAKE_OVER``): after its head went
out through ASGI, the response's frames are written to the transport by the response's own
code (api.sse), and the ASGI call returns. The protocol tells it what only a protocol
hears (the peer gone, the write buffer full or drained); when the response ends, the
connection goes back to keep-alive or closes (always, once the server is shutting
down), as uvicorn's own cycle would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from asyncio import TimerHandle
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tokenrelay.shared.settings import get_settings

KEEP_ALIVE_S = 5  # uvicorn's timeout_keep_alive: an idle connection between requests
# The ASGI extension through which a response drops its connection at once (a viewer that
# stopped reading, cut by the send timeout): scope["extensions"][RESET]["reset"]().
RESET = "tokenrelay.http.reset"
# The ASGI extension through which a response, its head sent, takes its connection over:
# scope["extensions"][TAKE_OVER]["take_over"](scope, owner) -> the Line, or None.
TAKE_OVER = "tokenrelay.http.take_over"


class Owner(Protocol):
    """A response that took its connection over: what the protocol tells it."""

    def connection_lost(self) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


class Line(Protocol):
    """What a response that took its connection over writes to, and hands back."""

    @property
    def transport(self) -> asyncio.Transport: ...

    def release(self) -> None:
        """The response is complete (its last chunk written): keep-alive, or close."""

    def reset(self) -> None:
        """Drop the connection with a TCP reset."""


def reset(transport: asyncio.Transport) -> None:
    """Drop a connection with a TCP reset: the kernel discards what it still holds for the
    peer. A close() would wait for a peer that never reads, keeping the socket and its
    buffers (megabytes) for as long as the peer lives."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def reset_connection(scope: Any) -> None:
    """Reset the connection of ``scope`` if its server offers it (``tokenrelay api`` does;
    elsewhere the server's own close applies)."""
    found = scope.get("extensions", {}).get(RESET)
    if found is not None:
        found["reset"]()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    _head_bytes = 0
    _in_head = True
    _clock: TimerHandle | None = None
    _owner: Owner | None = None  # the response that took the connection over, while it runs
    _taken: RequestResponseCycle | None = None  # the cycle it took over

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        settings = get_settings()
        self._max_head = settings.request_head_max_bytes
        self._head_timeout_s = settings.request_head_timeout_s
        self._body_timeout_s = settings.request_body_timeout_s
        super().connection_made(transport)
        self._head_started()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        owner, self._owner, self._taken = self._owner, None, None
        super().connection_lost(exc)
        if owner is not None:
            owner.connection_lost()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._owner is not None:
            self._owner.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._owner is not None:
            self._owner.resume_writing()

    def shutdown(self) -> None:
        if self._taken is not None:  # a stream runs: close once it has ended (its drain hint)
            self._taken.keep_alive = False
        else:
            super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after parsing: a chunk that also completed the head (and carries the
        # start of a body) is not a large head.
        if self._in_head and self._head_bytes > self._max_head and not self.transport.is_closing():
            self._refuse(b"431 Request Header Fields Too Large",
                         f"request head over {self._max_head} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {RESET: {"reset": self.reset},
                                    TAKE_OVER: {"take_over": self._take_over}}
        if not self._in_head:  # the next request on a kept-alive connection
            self._head_started()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._set_clock(self._body_timeout_s, self._body_too_slow)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stop_clock()
        super().on_message_complete()

    def _head_started(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._set_clock(self._head_timeout_s, self._head_too_slow)

    def _set_clock(self, delay: float, callback: object) -> None:
        self._stop_clock()
        self._clock = self.loop.call_later(delay, callback)  # type: ignore[arg-type]

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    def _head_too_slow(self) -> None:
        if not self.transport.is_closing():
            self._refuse(b"408 Request Timeout",
                         f"request head not complete within {self._head_timeout_s:g} s")

    def _body_too_slow(self) -> None:
        # The app is reading the body: closing tells it the client is gone.
        if not self.transport.is_closing():
            self.logger.warning("closing a request whose body took over %g s",
                                self._body_timeout_s)
            self.transport.close()

    def reset(self) -> None:
        if not self.transport.is_closing():
            reset(self.transport)

    def _take_over(self, scope: Any, owner: Owner) -> Line | None:
        """Hand the connection to ``owner`` once ``scope``'s response has sent its head (chunked)
        through ASGI, or None if it cannot be: the cycle is not the connection's current one
        (a pipelined request arrived), or has ended, or the peer has gone.

        The cycle is marked disconnected, so that the ASGI call returns quietly (uvicorn
        closes a connection whose app returns with its response incomplete) and anything
        the app still sent would be dropped. It stays the connection's current cycle: a
        request pipelined meanwhile waits for this response's end, as it would for the app.
        """
        cycle = self.cycle
        if (self._owner is not None or cycle is None or cycle.scope is not scope
                or not cycle.response_started or cycle.response_complete
                or cycle.disconnected or not cycle.chunked_encoding
                or self.transport.is_closing()):
            return None
        cycle.disconnected = True
        self._owner = owner
        self._taken = cycle
        return self

    def release(self) -> None:
        """The taken-over response has written its last chunk: what uvicorn's cycle does
        when a response completes (close unless keep-alive, else the next request)."""
        cycle, self._owner, self._taken = self._taken, None, None
        if cycle is None:
            return
        cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def _refuse(self, status: bytes, message: str) -> None:
        self._stop_clock()
        body = ('{"error":{"code":"bad_request","message":"' + message + '"}}').encode()
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n"
                             b"connection: close\r\n\r\n" + body)
        self.transport.close()
