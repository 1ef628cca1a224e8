"""A taken-over socket (api.ws_connection.WebSocketConnection): RFC 6455 client frames in,
the closing handshake, keepalive and backpressure, against a fake transport; and in a real
server, the handshake handed over and a peer that answers no ping."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.utils import apply_mask

from tests.api.server import Api, serve, until
from tokenrelay.api.sse import Connection
from tokenrelay.api.ws_connection import WebSocketConnection
from tokenrelay.api.ws_transport import TakeoverProtocol
from tokenrelay.cli.redis_server import RedisServer

MASK = b"\x9a\x01\xff\x37"


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True,
                 rsv: int = 0, size: int | None = None) -> bytes:
    """One client frame; ``size``: the length its header claims (default: the payload's)."""
    size = len(payload) if size is None else size
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, bit | size))
    elif size < 1 << 16:
        head = bytes((first, bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + size.to_bytes(8, "big")
    return head + MASK + apply_mask(payload, MASK) if masked else head + payload


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each frame the server wrote (unmasked, whole)."""
    out = []
    while data:
        size, at = data[1] & 0x7F, 2
        if size >= 126:
            width = 2 if size == 126 else 8
            size, at = int.from_bytes(data[2 : 2 + width], "big"), 2 + width
        out.append((data[0] & 0x0F, data[at : at + size]))
        assert data[0] & 0x80, "a server frame is final"
        data = data[at + size :]
    return out


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str) -> Any:
        return None

    def frames(self) -> list[tuple[int, bytes]]:
        written, self.written = self.written, b""
        return server_frames(written)


class FakeHandler:
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn = Connection(loop, None, loop.time(), "test")
        self.messages: list[str | None] = []
        self.ended = 0
        self.gate: asyncio.Event | None = None  # handle() waits for it when set
        self.socket: WebSocketConnection | None = None

    def opened(self, socket: WebSocketConnection) -> None:
        self.socket = socket

    async def handle(self, raw: str | None) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.messages.append(raw)

    async def end(self) -> None:
        self.ended += 1


@pytest.fixture
async def pair() -> AsyncIterator[tuple[WebSocketConnection, FakeTransport, FakeHandler]]:
    transport, handler = FakeTransport(), FakeHandler()
    connection = WebSocketConnection(transport, handler, set(), 100)  # type: ignore[arg-type]
    connection.opened(b"")
    yield connection, transport, handler
    connection.connection_lost(None)


Pair = tuple[WebSocketConnection, FakeTransport, FakeHandler]


async def settle() -> None:
    """Let the connection's short tasks (handling, ending) run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_messages_cut_anywhere_arrive_whole_and_in_order(pair: Pair) -> None:
    """Two text messages (one with a 16-bit length) and a binary one, fed a byte at a time
    and then in one chunk, reach the handler as whole messages, in order."""
    socket, transport, handler = pair
    data = (client_frame(0x1, "héllo".encode()) + client_frame(0x1, b"x" * 90)
            + client_frame(0x2, b"\x00\x01"))
    for i in range(len(data)):
        socket.data_received(data[i : i + 1])
    socket.data_received(data)
    await settle()
    assert handler.messages == ["héllo", "x" * 90, None] * 2
    assert transport.reading and not transport.closed


async def test_fragments_make_one_message_and_a_ping_between_them_is_answered(
    pair: Pair,
) -> None:
    """A message in three fragments with a ping between them is one message; the ping gets
    a pong with its payload, at once."""
    socket, transport, handler = pair
    socket.data_received(client_frame(0x1, b"he", fin=False) + client_frame(0x9, b"beat")
                         + client_frame(0x0, b"ll", fin=False))
    assert transport.frames() == [(0xA, b"beat")]
    socket.data_received(client_frame(0x0, b"o"))
    await settle()
    assert handler.messages == ["hello"]


@pytest.mark.parametrize("data", [
    client_frame(0x1, b"", size=101),  # the header says it all: nothing is buffered
    client_frame(0x1, b"x" * 60, fin=False) + client_frame(0x0, b"y" * 41),
], ids=["one frame", "fragments"])
async def test_a_message_over_max_size_fails_the_connection_with_1009(
    pair: Pair, data: bytes,
) -> None:
    """A message over the limit (100 bytes here) closes the connection with 1009, and none
    of it reaches the handler."""
    socket, transport, handler = pair
    socket.data_received(data)
    await settle()
    assert transport.frames()[-1] == (0x8, (1009).to_bytes(2, "big")
                                      + b"message over 100 bytes")
    assert transport.closed and handler.messages == [] and handler.ended == 1


@pytest.mark.parametrize(("data", "code"), [
    (client_frame(0x1, b"x", masked=False), 1002),
    (client_frame(0x1, b"x", rsv=0x40), 1002),
    (client_frame(0x3, b"x"), 1002),
    (client_frame(0x9, b"x" * 126), 1002),
    (client_frame(0x9, b"x", fin=False), 1002),
    (client_frame(0x0, b"x"), 1002),
    (client_frame(0x1, b"x", fin=False) + client_frame(0x1, b"y"), 1002),
    (client_frame(0x1, b"\xff\xfe"), 1007),
    (client_frame(0x8, b"\x03"), 1002),
    (client_frame(0x8, (1005).to_bytes(2, "big")), 1002),
    (client_frame(0x8, (2999).to_bytes(2, "big")), 1002),
    (client_frame(0x8, (1000).to_bytes(2, "big") + b"\xff"), 1007),
], ids=["unmasked", "reserved bit", "unknown opcode", "long control", "fragmented control",
        "stray continuation", "message inside a message", "invalid utf-8", "one-byte close",
        "close 1005", "close 2999", "close reason not utf-8"])
async def test_protocol_errors_fail_the_connection(pair: Pair, data: bytes, code: int) -> None:
    """Each violation of RFC 6455 by the client closes the connection with its code."""
    socket, transport, handler = pair
    socket.data_received(data + client_frame(0x1, b"after"))
    await settle()
    opcode, payload = transport.frames()[-1]
    assert (opcode, int.from_bytes(payload[:2], "big")) == (0x8, code)
    assert transport.closed and handler.messages == [] and handler.ended == 1


async def test_the_peers_close_is_answered_with_its_code_and_ends_the_handler(
    pair: Pair,
) -> None:
    """A close from the client (code and reason) is echoed with its code; the TCP
    connection closes and the handler ends once; a close without a code gets one without."""
    socket, transport, handler = pair
    socket.data_received(client_frame(0x8, (4001).to_bytes(2, "big") + b"bye"))
    await settle()
    assert transport.frames() == [(0x8, (4001).to_bytes(2, "big"))]
    assert transport.closed and handler.ended == 1
    transport, handler = FakeTransport(), FakeHandler()
    other = WebSocketConnection(transport, handler, set(), 100)  # type: ignore[arg-type]
    other.opened(client_frame(0x8, b""))
    await settle()
    assert transport.frames() == [(0x8, b"")] and handler.ended == 1


async def test_our_close_waits_for_the_peers_and_nothing_is_handled_meanwhile(
    pair: Pair,
) -> None:
    """After the server's close (the drain's 1012) the handler ends at once, messages still
    coming are not handled, and the peer's close completes the handshake."""
    socket, transport, handler = pair
    socket.close(1012, "server restarting; reconnect")
    await settle()
    assert transport.frames() == [(0x8, (1012).to_bytes(2, "big")
                                   + b"server restarting; reconnect")]
    assert handler.ended == 1 and not transport.closed
    socket.data_received(client_frame(0x1, b"late") + client_frame(0x9, b"p"))
    await settle()
    assert handler.messages == [] and transport.frames() == []
    with pytest.raises(OSError):
        await socket.send_texts(["after the close"])
    socket.data_received(client_frame(0x8, (1012).to_bytes(2, "big")))
    assert transport.closed and handler.ended == 1


async def test_keepalive_drops_a_peer_that_answers_no_ping(pair: Pair) -> None:
    """Each heartbeat writes the ping message and a protocol ping; a pong clears it, and a
    heartbeat that finds the previous ping unanswered fails the connection with 1011."""
    socket, transport, handler = pair
    socket.ping()
    assert transport.frames() == [(0x1, b'{"type":"ping"}'), (0x9, b"")]
    socket.data_received(client_frame(0xA, b""))
    socket.ping()
    assert len(transport.frames()) == 2 and not transport.closed
    socket.ping()
    opcode, payload = transport.frames()[-1]
    assert (opcode, payload[:2]) == (0x8, (1011).to_bytes(2, "big"))
    await settle()
    assert transport.closed and handler.ended == 1


async def test_sends_wait_while_the_peer_is_behind_and_fail_once_it_is_gone(
    pair: Pair,
) -> None:
    """Over the high-water mark a send waits (timed for the ticker) until the transport
    drains; a send waiting when the connection is lost raises."""
    socket, transport, handler = pair
    socket.pause_writing()
    assert handler.conn.send_started > 0
    waiting = asyncio.create_task(socket.send_frames(b"\x81\x01a"))
    await settle()
    assert not waiting.done() and transport.written == b""
    socket.resume_writing()
    await waiting
    assert transport.written == b"\x81\x01a" and handler.conn.send_started == 0.0
    socket.pause_writing()
    waiting = asyncio.create_task(socket.send_texts(["b"]))
    await settle()
    socket.connection_lost(None)
    with pytest.raises(OSError):
        await waiting


async def test_reading_pauses_while_the_handler_works(pair: Pair) -> None:
    """Messages are handled one at a time in order; the socket reads nothing more while
    one is being handled, and resumes after the last."""
    socket, transport, handler = pair
    handler.gate = asyncio.Event()
    socket.data_received(client_frame(0x1, b"one") + client_frame(0x1, b"two"))
    await settle()
    assert not transport.reading and handler.messages == []
    handler.gate.set()
    await settle()
    assert handler.messages == ["one", "two"] and transport.reading


# --- in a real server ------------------------------------------------------------------


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[Api]:
    async with serve(redis_server, ws=TakeoverProtocol, heartbeat_s=0.2) as running:
        yield running


def url(api: Api) -> str:
    return api.url.replace("http://", "ws://") + "/v1/ws"


async def test_the_closing_handshake_ends_the_socket(api: Api) -> None:
    """A client's close gets its answer (the same code) and the socket leaves the ticker."""
    async with connect(url(api)) as ws:
        await until(lambda: len(api.hub.connections) == 1, "the socket to be registered")
        await ws.close(4000, "done")
        rcvd = ws.protocol.close_rcvd
        assert rcvd is not None and rcvd.code == 4000
    await until(lambda: len(api.hub.connections) == 0, "the socket to leave the ticker")


async def test_a_peer_that_answers_no_ping_is_closed_with_1011(api: Api) -> None:
    """A raw client that reads but never answers a protocol ping gets the `ping` message and
    a ping, then, one heartbeat later, a close with 1011."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    data = b""
    while b"\x88" not in data:  # a close frame's first byte (no message here holds it)
        chunk = await asyncio.wait_for(reader.read(4096), 5)
        assert chunk, f"closed without a close frame after {data!r}"
        data += chunk
    frames = server_frames(data)
    assert frames[:2] == [(0x1, b'{"type":"ping"}'), (0x9, b"")]
    assert frames[-1][0] == 0x8 and frames[-1][1][:2] == (1011).to_bytes(2, "big")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and the TCP connection closes
    writer.close()
    await until(lambda: len(api.hub.connections) == 0, "the socket to leave the ticker")
