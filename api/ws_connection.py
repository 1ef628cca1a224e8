"""A ``/v1/ws`` socket taken over after its handshake (api.ws_transport): the server side of
RFC 6455 for one connection, driven by callbacks.

    data_received ─ frames (masked, fragments, ping, close) ─▶ inbox
        inbox ─ one short task while messages wait (reading paused) ─▶ handler.handle
    handler (subscriptions) ─ send_frames / send_texts ─▶ transport.write
        over the high-water mark: sends wait for resume_writing; the ticker times it
    ticker (api.sse.Connections) ─ idle ─▶ ping (a message and a protocol ping);
        stalled ─▶ reset;  SIGTERM ─▶ close 1012

An idle socket is this object and what its handler holds: no task, no queue, no event,
no timer (the process's ticker times everything), and nothing of the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

from uvicorn.protocols.utils import ClientDisconnected

from tokenrelay.api.protocol import reset
from tokenrelay.api.sse import Connection
from tokenrelay.api.ws_protocol import DRAIN, PING, text_frame

try:  # websockets' C unmasking, as its own parser uses
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

CLOSE_TIMEOUT_S = 10.0  # how long a close we sent waits for the peer's (uvicorn's figure)
_PING_FRAME = b"\x89\x00"  # a protocol ping, empty: any pong before the next one will do
_PING_WRITE = text_frame(PING.encode()) + _PING_FRAME
_OPCODES = {0x0, 0x1, 0x2, 0x8, 0x9, 0xA}  # continuation, text, binary, close, ping, pong


class Handler(Protocol):
    """What runs a taken-over socket (api.ws_session's Session)."""

    conn: Connection  # the socket as the ticker sees it: writes are timed on it

    def opened(self, socket: WebSocketConnection) -> None:
        """The socket is the handler's from now on."""

    async def handle(self, raw: str | None) -> None:
        """One client message (None: a binary one), handled to its end; called in order."""

    async def end(self) -> None:
        """The socket is gone or closing: release everything (called once)."""


class WebSocketConnection(asyncio.Protocol):
    """One accepted socket: client frames in, the handler's messages and frames out.

    A server side of RFC 6455 without extensions: client frames must be masked, control
    frames short and whole, fragments in order and a message within ``max_size``
    bytes (else the connection is failed with 1002, 1007 or 1009, as websockets does).
    """

    __slots__ = ("transport", "handler", "connections", "max_size", "_rest", "_need", "_parts",
                 "_inbox", "_worker", "_writable", "_pong_due", "_close_sent", "_gone",
                 "_timer", "_ending")

    def __init__(self, transport: asyncio.Transport, handler: Handler,
                 connections: set[Any], max_size: int):
        self.transport = transport
        self.handler = handler
        self.connections = connections  # uvicorn's: it shuts down and waits for its members
        self.max_size = max_size
        self._rest: bytearray | None = None  # an unfinished frame
        self._need = 0  # how long _rest must be before the frame can be read
        self._parts: list[bytes] | None = None  # a fragmented message: opcode byte, parts
        self._inbox: list[str | None] | None = None  # messages waiting for the handler
        self._worker: asyncio.Task[None] | None = None  # the task handling them
        self._writable: asyncio.Future[None] | None = None  # while over the high-water mark
        self._pong_due = False
        self._close_sent = False
        self._gone = False
        self._timer: asyncio.TimerHandle | None = None  # waiting for the peer's close
        self._ending: asyncio.Task[None] | None = None

    def opened(self, held: bytes) -> None:
        self.handler.opened(self)
        if held:
            self.data_received(held)

    # --- writing (the handler's side) ---------------------------------------------------

    frames = True  # takes pre-framed batches (api.ws_views.WS_FRAMES)

    async def send_frames(self, frames: bytes) -> None:
        """Write whole frames in one write; waits while the peer is behind (the ticker drops
        a socket that stays so for SEND_TIMEOUT_S)."""
        while self._writable is not None:
            await asyncio.shield(self._writable)
        if self._close_sent or self._gone:
            raise ClientDisconnected()
        self.transport.write(frames)
        conn = self.handler.conn
        conn.last_write = conn.loop.time()
        conn.ping_due = False

    async def send_texts(self, texts: Sequence[str]) -> None:
        await self.send_frames(b"".join([text_frame(text.encode()) for text in texts]))

    def ping(self) -> None:
        """A heartbeat: the ``ping`` message and a protocol ping. A peer that has not
        answered the previous heartbeat's ping is gone (a network that dropped it says
        nothing): it is dropped, which it would not be for a long time otherwise."""
        if self._close_sent or self._gone or self._writable is not None:
            return
        if self._pong_due:
            self._fail(1011, "keepalive ping timeout")
            return
        self._pong_due = True
        self.transport.write(_PING_WRITE)
        conn = self.handler.conn
        conn.last_write = conn.loop.time()
        conn.ping_due = False

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake: nothing is sent after it, the peer's close ends it."""
        if self._close_sent or self._gone:
            return
        self._send_close(code, reason)
        self.transport.resume_reading()  # the peer's close must be read
        self._timer = self.handler.conn.loop.call_later(CLOSE_TIMEOUT_S, self.drop)
        self._end()

    def drop(self) -> None:
        """Let go of the peer at once (it stopped reading): a reset, not a close that would
        wait for it to read what is buffered."""
        if not self._gone:
            reset(self.transport)

    def shutdown(self) -> None:
        """uvicorn's shutdown (after the app's drain): close whatever is still open."""
        if not self._close_sent and not self._gone:
            self._send_close(*DRAIN)
        self.transport.close()
        self._end()

    def _send_close(self, code: int, reason: str) -> None:
        self._close_sent = True
        payload = code.to_bytes(2, "big") + reason.encode()[:123]
        self.transport.write(bytes((0x88, len(payload))) + payload)

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 §7.1.7): a close frame, then the TCP close."""
        if not self._close_sent:
            self._send_close(code, reason)
        self.transport.close()
        self._end()

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)  # the waiting sends find the socket gone
        self._end()

    def pause_writing(self) -> None:
        conn = self.handler.conn
        self._writable = conn.loop.create_future()
        conn.send_started = conn.loop.time()  # the ticker's clock: no progress since

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        self.handler.conn.send_started = 0.0
        if writable is not None and not writable.done():
            writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        rest = self._rest
        if rest is not None:
            rest += data
            if len(rest) < self._need:
                return  # a long frame arriving: not copied again until it is all here
            data = bytes(rest)
        used = self._frames(data)
        self._rest = bytearray(data[used:]) if used < len(data) and not self._gone else None

    def _frames(self, data: bytes) -> int:
        """Handle the whole frames at the start of ``data``; how many bytes they took (and
        in ``_need``, how many the next one needs at least)."""
        pos, end = 0, len(data)
        self._need = 2
        while end - pos >= 2 and not self.transport.is_closing():
            first, second = data[pos], data[pos + 1]
            opcode, size, head = first & 0x0F, second & 0x7F, pos + 2
            if first & 0x70 or opcode not in _OPCODES:
                self._fail(1002, "reserved bits or opcode")
                break
            if not second & 0x80:
                self._fail(1002, "a client frame must be masked")
                break
            if size >= 126:
                width = 2 if size == 126 else 8
                if end - head < width:
                    self._need = 2 + width
                    break
                size = int.from_bytes(data[head : head + width], "big")
                head += width
            if opcode >= 0x8 and (size > 125 or not first & 0x80):
                self._fail(1002, "a control frame must be whole and short")
                break
            held = sum(map(len, self._parts)) - 1 if self._parts is not None else 0
            if opcode < 0x8 and held + size > self.max_size:
                self._fail(1009, f"message over {self.max_size} bytes")
                break
            if end - head < 4 + size:
                self._need = head - pos + 4 + size
                break
            payload = apply_mask(data[head + 4 : head + 4 + size], data[head : head + 4])
            pos = head + 4 + size
            if opcode >= 0x8:
                self._control(opcode, payload)
            else:
                self._data(first, payload)
        return pos

    def _data(self, first: int, payload: bytes) -> None:
        opcode, fin, parts = first & 0x0F, first & 0x80, self._parts
        if (opcode == 0x0) == (parts is None):
            self._fail(1002, "a continuation frame without a message, or a message inside one"
                       if parts is None else "a new message inside a fragmented one")
            return
        if not fin:
            if parts is None:
                self._parts = [bytes((opcode,)), payload]
            else:
                parts.append(payload)
            return
        if parts is not None:
            opcode, payload = parts[0][0], b"".join([*parts[1:], payload])
            self._parts = None
        if self._close_sent:
            return  # closing: what comes now is not handled any more
        if opcode == 0x2:
            self._received(None)
            return
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            self._fail(1007, "invalid UTF-8 in a text message")
            return
        self._received(text)

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:
            if not self._close_sent:
                self.transport.write(bytes((0x8A, len(payload))) + payload)
        elif opcode == 0xA:
            self._pong_due = False
        elif self._close_sent:  # the peer's answer to our close: the handshake is done
            self.transport.close()
        else:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if len(payload) == 1 or code is not None and not _valid_close_code(code):
                self._fail(1002, "invalid close code")
                return
            try:
                payload[2:].decode()
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8 in the close reason")
                return
            self._close_sent = True  # our answer: the same code (none if it gave none)
            self.transport.write(b"\x88\x00" if code is None else b"\x88\x02" + payload[:2])
            self.transport.close()
            self._end()

    # --- the handler's messages ---------------------------------------------------------

    def _received(self, raw: str | None) -> None:
        inbox = self._inbox
        if inbox is not None:
            inbox.append(raw)
            return
        # Read no more until the handler is through (as uvicorn does after each message):
        # a client that sends faster than it is answered waits in its own buffers.
        self._inbox = [raw]
        self.transport.pause_reading()
        self._worker = self.handler.conn.loop.create_task(self._work(),
                                                            name="tr-ws-in")

    async def _work(self) -> None:
        inbox = self._inbox
        try:
            while inbox:
                await self.handler.handle(inbox.pop(0))
        except ClientDisconnected:
            pass  # gone while answering: connection_lost ends the rest
        finally:
            self._inbox = self._worker = None
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def _end(self) -> None:
        """Release the handler once: after the last message it was handling, if any."""
        if self._ending is None:
            self._ending = self.handler.conn.loop.create_task(self._release(),
                                                              name="tr-ws-end")

    async def _release(self) -> None:
        worker = self._worker
        if worker is not None and not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        await self.handler.end()


def _valid_close_code(code: int) -> bool:
    """A code a peer may send (RFC 6455 §7.4; 1004-1006 and 1015 are never on the wire)."""
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999
