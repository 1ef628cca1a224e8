"""What one WebSocket batch write costs the API, per socket, without the network or the hub.

    python bench/ws_write_cost.py                  # this tree: WebSocketConnection.send_frames
    <tree at c5eaf45>/.venv/bin/python bench/ws_write_cost.py   # before the takeover

A subscription writes each batch of pre-framed events with one call; this times that call
alone against a transport that drops the bytes, best of five runs of 200,000, so that a
busy machine (where ``bench/ws.py``'s CPU shares drift by tens of percent between runs)
still compares the two write paths. Before the takeover (commit c5eaf45) the call was the
session's ``write_frames`` (its send lock, a message dict) into uvicorn's protocol's
``send`` (its ``writable`` event, state checks); now it is the taken-over connection's
``send_frames``. The ASGI layers the old message also crossed are not counted.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import install_uvloop  # noqa: E402

CALLS = 200_000
FRAMES = b"\x81\x05hello"


class NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def taken_over(loop: asyncio.AbstractEventLoop) -> tuple[str, Callable[[], Awaitable[None]]]:
    from tokenrelay.api.sse import Connection
    from tokenrelay.api.ws_connection import WebSocketConnection

    class Handler:
        conn = Connection(loop, None, loop.time(), "bench")

    socket = WebSocketConnection(NullTransport(), Handler(), set(), 1 << 20)  # type: ignore[arg-type]
    return "WebSocketConnection.send_frames", lambda: socket.send_frames(FRAMES)


def through_uvicorn(loop: asyncio.AbstractEventLoop) -> tuple[str, Callable[[], Awaitable[None]]]:
    """The write path of commit c5eaf45, its objects made without a server."""
    from websockets.protocol import State

    from tokenrelay.api.sse import Connection
    from tokenrelay.api.ws_session import Session  # type: ignore[attr-defined]
    from tokenrelay.api.ws_transport import FramesWebSocketProtocol  # type: ignore[attr-defined]

    protocol: Any = object.__new__(FramesWebSocketProtocol)
    protocol.writable = asyncio.Event()
    protocol.writable.set()
    protocol.disconnected = protocol.close_sent = False
    protocol.conn = type("Conn", (), {"state": State.OPEN})()
    protocol.transport = NullTransport()
    session: Any = object.__new__(Session)
    session.conn, session.lock, session.loop = Connection(loop, None, loop.time(), "bench"), \
        asyncio.Lock(), loop
    session.send_frames = protocol.send
    return ("Session.write_frames -> FramesWebSocketProtocol.send",
            lambda: session.write_frames(FRAMES))


async def main() -> None:
    loop = asyncio.get_running_loop()
    try:
        label, call = taken_over(loop)
    except ImportError:
        label, call = through_uvicorn(loop)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(CALLS):
            await call()
        best = min(best, (time.perf_counter() - started) / CALLS)
    print(f"{label}: {best * 1e9:.0f} ns per batch write (best of 5 x {CALLS:,})")


if __name__ == "__main__":
    install_uvloop()
    asyncio.run(main())
