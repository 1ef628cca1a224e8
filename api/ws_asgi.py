"""A ``/v1/ws`` session on plain ASGI messages: the socket under a server that does not take
it over (api.ws_transport), e.g. uvicorn's own WebSocket protocols.

The app's task reads the socket for its whole life (``receive()`` is also the only prompt
way to see a disconnect), and each message is one ``websocket.send``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from starlette.websockets import WebSocket

from tokenrelay.api import ws_protocol as proto
from tokenrelay.api.sse import Connection
from tokenrelay.api.ws_session import GONE, Session


class AsgiSocket:
    """The session's Wire (api.ws_session) on a socket served through ASGI: one
    ``websocket.send`` per message, under a lock so that the messages of concurrent
    senders do not interleave, each timed for the ticker."""

    frames = False

    def __init__(self, websocket: WebSocket, conn: Connection):
        self.ws = websocket
        self.conn = conn
        self.lock = asyncio.Lock()
        self._side: asyncio.Task[None] | None = None  # a ping or the drain close

    async def send_texts(self, texts: Sequence[str]) -> None:
        conn, ws = self.conn, self.ws
        async with self.lock:
            for text in texts:
                conn.send_started = now = conn.loop.time()
                await ws.send({"type": "websocket.send", "text": text})
                conn.send_started = 0.0
                conn.last_write = now
            conn.ping_due = False

    async def send_frames(self, frames: bytes) -> None:
        raise NotImplementedError("an ASGI socket takes message texts")

    def ping(self) -> None:
        self._aside(self.send_texts((proto.PING,)))

    def close(self, code: int, reason: str) -> None:
        self._aside(self._close(code, reason))

    def drop(self) -> None:
        """Nothing more to do here: the ticker cancelled the socket's task (run_asgi), and
        the server closes the socket when it ends."""

    def _aside(self, work: Any) -> None:
        side = self._side
        if side is not None and not side.done():
            work.close()  # one at a time; the next heartbeat tries again
            return
        self._side = self.conn.loop.create_task(self._quietly(work))

    async def _quietly(self, work: Any) -> None:
        with contextlib.suppress(*GONE):
            await work

    async def _close(self, code: int, reason: str) -> None:
        async with self.lock:
            await self.ws.close(code, reason)

    def cancel(self) -> None:
        if self._side is not None:
            self._side.cancel()


async def run_asgi(session: Session, websocket: WebSocket) -> None:
    """Serve an accepted ASGI socket in the app's task: read its messages until it goes."""
    wire = AsgiSocket(websocket, session.conn)
    session.opened(wire)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            await session.handle(message.get("text"))
    except GONE:
        return  # a reply found the socket closed
    except asyncio.CancelledError:
        # Our ticker's cancel (a stalled socket): end quietly; any other propagates.
        task = session.conn.task
        if not session.conn.stalled or task is None:
            raise
        task.uncancel()
    finally:
        wire.cancel()
        await session.end()
