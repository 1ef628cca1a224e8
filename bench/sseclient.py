"""A load client for SSE: one ``asyncio.Protocol`` per connection, no task, no HTTP library.

Cheap per connection (a few hundred bytes of state and one callback per TCP
read) so that thousands of viewers in one process measure the server, not the
client. It speaks just enough HTTP/1.1 for tokenrelay: a request, a response
head, chunked transfer coding. For every event it records the delivery latency
(the client's clock minus the millisecond part of the event id, which is when
Redis appended the event) and the id itself, so that loss and duplicates can be
counted per viewer against the stream as Redis holds it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

TERMINAL = frozenset({b"done", b"cancelled", b"error"})
SEQ_BITS = 20  # an id ms-seq packs into one int: ms << 20 | seq (seq < 1M per ms)


def pack_id(raw: bytes | str) -> int:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms) << SEQ_BITS | int(seq)


def unpack_id(packed: int) -> str:
    return f"{packed >> SEQ_BITS}-{packed & ((1 << SEQ_BITS) - 1)}"


def request_bytes(
    method: str, path: str, host: str, headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(eq=False)
class Viewer:
    """What one connection saw."""

    name: int = 0
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    ids: array = field(default_factory=lambda: array("q"))  # type: ignore[type-arg]
    types: list[bytes] = field(default_factory=list)
    pings: int = 0
    retry_seen: bool = False
    terminal: bytes | None = None
    ended: bool = False  # the server closed the chunked body (0-length chunk)
    error: str | None = None
    sent_at: float = 0.0  # time.time() when the request was written
    first_event_at: float = 0.0  # time.time() of the first event of this connection
    first_event_id: int = 0
    closed: asyncio.Future[None] | None = None
    keep_types: bool = False


class RequestProtocol(asyncio.Protocol):
    """A load client's connection: writes its request on connect, reads the response's head,
    then hands the body to :meth:`body` (SSE here, WebSocket frames in bench/wsclient.py)."""

    def __init__(self, viewer: Viewer, request: bytes):
        self.viewer = viewer
        self.request = request
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._in_body = False
        viewer.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.viewer.sent_at = time.time()
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        closed = self.viewer.closed
        if closed is not None and not closed.done():
            closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now_ms = time.time() * 1000.0
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = bytes(self._head[:end]), bytes(self._head[end + 4 :])
            self._head = bytearray()
            self._in_body = True
            if not self.opened(head, data):
                return
        self.body(data, now_ms)

    def opened(self, head: bytes, data: bytes) -> bool:
        """The response's head arrived (``data``: the first body bytes); False to stop."""
        raise NotImplementedError

    def body(self, data: bytes, now_ms: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class SSEProtocol(RequestProtocol):
    """One HTTP request and its SSE response; feeds ``Viewer`` and the shared latency array."""

    def __init__(
        self,
        viewer: Viewer,
        request: bytes,
        latencies: array,  # type: ignore[type-arg]
        stop_after: int | None = None,
        on_event: Callable[[Viewer, bytes, bytes, float], None] | None = None,
    ):
        super().__init__(viewer, request)
        self.latencies = latencies
        self.stop_after = stop_after
        self.on_event = on_event
        self._raw = bytearray()
        self._chunked = True  # tokenrelay answers chunked; nchan writes the body as is
        self._sse_rest = b""
        self._count = 0

    def opened(self, head: bytes, data: bytes) -> bool:
        self._parse_head(head)
        if self.viewer.status != 200:
            self.viewer.error = f"HTTP {self.viewer.status}: {data[:200]!r}"
            self.close()
            return False
        self._chunked = self.viewer.headers.get(b"transfer-encoding") == b"chunked"
        return True

    def body(self, data: bytes, now_ms: float) -> None:
        if self._chunked:
            self._dechunk(data, now_ms)
        else:
            self._frames(data, now_ms)

    # parsing

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.viewer.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.viewer.headers[name.strip().lower()] = value.strip()

    def _dechunk(self, data: bytes, now_ms: float) -> None:
        if self._raw:  # a chunk was split across reads: join (rare), else parse in place
            data = bytes(self._raw) + data
            self._raw.clear()
        pos = 0
        size_end = len(data)
        while pos < size_end:
            nl = data.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(data[pos:nl], 16)
            end = nl + 2 + size
            if end + 2 > size_end:
                break
            if size == 0:
                self.viewer.ended = True
                self.close()
                return
            self._frames(data[nl + 2 : end], now_ms)
            pos = end + 2
            if self.transport is None or self.transport.is_closing():
                return
        if pos < size_end:
            self._raw += data[pos:]

    def _frames(self, payload: bytes, now_ms: float) -> None:
        if self._sse_rest:
            payload = self._sse_rest + payload
        frames = payload.split(b"\n\n")
        self._sse_rest = frames.pop()
        viewer = self.viewer
        for frame in frames:
            while frame.startswith(b":") or frame.startswith(b"retry:"):
                # Comment lines (": ping", with or without a blank line after them) and
                # "retry:" may precede an event in the same block: count, drop, go on.
                if frame.startswith(b":"):
                    viewer.pings += 1
                else:
                    viewer.retry_seen = True
                nl = frame.find(b"\n")
                frame = b"" if nl < 0 else frame[nl + 1 :]
            if frame.startswith(b"id: "):  # tokenrelay: id, event, data
                nl = frame.find(b"\n")
                eid = frame[4:nl]
                etype = frame[nl + 8 : frame.find(b"\n", nl + 1)]
            elif frame.startswith(b"event: "):  # nchan: event, id (its own), data (our id)
                nl = frame.find(b"\n")
                etype = frame[7:nl]
                eid = frame[frame.index(b"\ndata: ") + 7 :].split(b"\n", 1)[0]
            elif frame:
                viewer.error = f"unexpected frame {frame[:80]!r}"
                continue
            else:
                continue
            if self._event(viewer, eid, etype, frame, now_ms):
                return

    def _event(self, viewer: Viewer, eid: bytes, etype: bytes, frame: bytes,
               now_ms: float) -> bool:
        """Record one event whose id is ``ms-seq``; True when this connection is done."""
        dash = eid.find(b"-")
        ms = int(eid[:dash])
        packed = ms << SEQ_BITS | int(eid[dash + 1 :])
        self.latencies.append(now_ms - ms)
        viewer.ids.append(packed)
        if viewer.keep_types:
            viewer.types.append(etype)
        if self._count == 0:
            viewer.first_event_at = now_ms / 1000.0
            viewer.first_event_id = packed
        self._count += 1
        if self.on_event is not None:
            self.on_event(viewer, etype, frame, now_ms)
        if etype in TERMINAL:
            viewer.terminal = etype
        if self.stop_after is not None and self._count >= self.stop_after:
            self.close()
            return True
        return False

async def open_viewer(
    host: str,
    port: int,
    request: bytes,
    latencies: array,  # type: ignore[type-arg]
    viewer: Viewer | None = None,
    stop_after: int | None = None,
    on_event: Callable[[Viewer, bytes, bytes, float], None] | None = None,
    rcvbuf: int | None = None,
) -> tuple[Viewer, SSEProtocol]:
    viewer = viewer or Viewer()
    loop = asyncio.get_running_loop()

    def factory() -> SSEProtocol:
        return SSEProtocol(viewer, request, latencies, stop_after, on_event)

    if rcvbuf is None:
        _, proto = await loop.create_connection(factory, host, port)
    else:  # a small receive buffer, set before connecting (a slow or stalled reader)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        _, proto = await loop.create_connection(factory, sock=sock)
    return viewer, proto


async def open_many(
    count: int,
    host: str,
    port: int,
    request: Callable[[int], bytes],
    latencies: array,  # type: ignore[type-arg]
    parallel: int = 64,
    stop_after: int | None = None,
    rcvbuf: int | None = None,
) -> list[tuple[Viewer, SSEProtocol]]:
    """Open ``count`` connections, at most ``parallel`` connects in flight (no SYN storm)."""
    out: list[tuple[Viewer, SSEProtocol] | None] = [None] * count
    next_index = 0

    async def opener() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            out[i] = await open_viewer(
                host, port, request(i), latencies, Viewer(name=i), stop_after, rcvbuf=rcvbuf
            )

    await asyncio.gather(*(opener() for _ in range(min(parallel, count))))
    return [pair for pair in out if pair is not None]
