"""The WebSocket protocol a bare ``tokenrelay api`` serves with: uvicorn's websockets-sansio
protocol plus one ASGI extension, pre-framed writes.

Through plain ASGI every message is one ``websocket.send``: the websockets library
frames it, per socket, and it is one ``transport.write``. A thousand sockets watching
one generation then cost a thousand framings and a thousand writes per event, where an
SSE viewer costs one write per batch of events. Without compression a server's frame
(RFC 6455 §5.2: unmasked) is the same bytes for every socket, so the hub frames each
event once per process (``ws_protocol.text_frame``) and a socket writes a whole batch
of frames in one ``transport.write``, with the same backpressure as ``send`` (it waits
while the transport is over its high-water mark).

The extension is offered in the scope (``extensions["tokenrelay.websocket.frames"]``)
only when the connection negotiated no WebSocket extension (``permessage-deflate``
would rewrite every frame per socket); an app that does not find it sends plain
``websocket.send`` messages, as under any other server. With it comes ``ABORT``: the
app drops a socket whose peer stopped reading (its send timeout) with a reset instead
of a close that would wait for the peer forever.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from tokenrelay.api.protocol import reset

FRAMES = "tokenrelay.websocket.frames"  # the extension's name, and its message type
# Drop the connection at once (a peer that stopped reading): a close() would wait for the
# write buffer to drain, which never happens, and keep the connection and what it holds.
ABORT = "tokenrelay.websocket.abort"


class FramesWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app's task is created but has not run yet: the scope can still be told.
        if self.response.status_code == 101 and not self.conn.extensions:
            self.scope["extensions"][FRAMES] = {}

    async def send(self, message: Any) -> None:
        if message["type"] == ABORT:
            reset(self.transport)
            return
        if message["type"] != FRAMES:
            await super().send(message)
            if message["type"] == "websocket.accept" and self.handshake_complete:
                # The handshake's request and response are not read again: not kept for the
                # socket's life (a few KiB per socket).
                del self.request, self.response
            return
        await self.writable.wait()
        if self.disconnected or self.close_sent or self.conn.state is not State.OPEN:
            raise ClientDisconnected()
        self.transport.write(message["frames"])
