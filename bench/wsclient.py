"""A load client for ``/v1/ws``: one ``asyncio.Protocol`` per socket, no task, no library.

The WebSocket twin of ``bench/sseclient.py`` and as cheap per connection, so that a
thousand sockets in one process measure the server, not the client: it writes the
upgrade request, reads the ``101`` head, subscribes to one generation with one masked
text frame, then parses the server's (unmasked) frames in place, answers protocol
pings, and for every ``event`` message records the delivery latency (client clock minus
the millisecond part of the event id) and the id, into the same :class:`Viewer` as the
SSE client, so that loss and duplicates are counted the same way. After the terminal
event it closes the socket.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from array import array

from bench.sseclient import SEQ_BITS, TERMINAL, RequestProtocol, Viewer

_EVENT = b'{"type":"event",'
_ID = b'"id":"'
_TYPE = b'"event":"'


def upgrade_request(host: str, path: str = "/v1/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked (RFC 6455 requires it; the key may be any 4 bytes:
    zeros leave the payload as it is)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return head + b"\x00\x00\x00\x00" + payload


class WSProtocol(RequestProtocol):
    """One socket subscribed to one generation."""

    def __init__(self, viewer: Viewer, host: str, gen_id: str,
                 latencies: array):  # type: ignore[type-arg]
        super().__init__(viewer, upgrade_request(host))
        self.subscribe = client_frame(0x1, json.dumps(
            {"type": "subscribe", "generation_id": gen_id}).encode())
        self.latencies = latencies
        self._rest = b""

    def opened(self, head: bytes, data: bytes) -> bool:
        status = int(head.split(b" ", 2)[1])
        self.viewer.status = status
        if status != 101:
            self.viewer.error = f"HTTP {status}: {data[:200]!r}"
            self.close()
            return False
        assert self.transport is not None
        self.transport.write(self.subscribe)
        return True

    def body(self, data: bytes, now_ms: float) -> None:
        self._frames(self._rest + data if self._rest else data, now_ms)

    def _frames(self, data: bytes, now_ms: float) -> None:
        pos, end = 0, len(data)
        while end - pos >= 2:
            opcode, size = data[pos] & 0x0F, data[pos + 1] & 0x7F
            start = pos + 2
            if size == 126:
                if end - start < 2:
                    break
                size = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif size == 127:
                if end - start < 8:
                    break
                size = int.from_bytes(data[start : start + 8], "big")
                start += 8
            if end - start < size:
                break
            payload = data[start : start + size]
            pos = start + size
            if opcode == 0x1:
                if self._message(payload, now_ms):
                    return
            elif opcode == 0x9 and self.transport is not None:  # ping: answer pong
                self.transport.write(client_frame(0xA, payload))
            elif opcode == 0x8:  # close
                self.close()
                return
        self._rest = data[pos:]

    def _message(self, message: bytes, now_ms: float) -> bool:
        """Record one event message; True when the connection is done."""
        viewer = self.viewer
        if not message.startswith(_EVENT):
            if message == b'{"type":"ping"}':
                viewer.pings += 1
            elif b'"type":"error"' in message:
                viewer.error = message[:200].decode(errors="replace")
            return False
        at = message.index(_ID) + len(_ID)
        eid = message[at : message.index(b'"', at)]
        at = message.index(_TYPE, at) + len(_TYPE)
        etype = message[at : message.index(b'"', at)]
        dash = eid.find(b"-")
        ms = int(eid[:dash])
        packed = ms << SEQ_BITS | int(eid[dash + 1 :])
        self.latencies.append(now_ms - ms)
        viewer.ids.append(packed)
        if not viewer.first_event_id:
            viewer.first_event_at = now_ms / 1000.0
            viewer.first_event_id = packed
        if etype in TERMINAL:
            viewer.terminal = etype
            self.close()
            return True
        return False

async def open_many(n: int, host: str, port: int, gen_id: str,
                    latencies: array,  # type: ignore[type-arg]
                    parallel: int = 64) -> list[tuple[Viewer, WSProtocol]]:
    """Open ``n`` sockets subscribed to ``gen_id``, at most ``parallel`` connects at once."""
    loop = asyncio.get_running_loop()
    out: list[tuple[Viewer, WSProtocol]] = []
    semaphore = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        viewer = Viewer(name=i)
        async with semaphore:
            _, proto = await loop.create_connection(
                lambda: WSProtocol(viewer, f"{host}:{port}", gen_id, latencies), host, port)
        out.append((viewer, proto))

    await asyncio.gather(*(one(i) for i in range(n)))
    return out
