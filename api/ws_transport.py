"""The WebSocket protocol a bare ``tokenrelay api`` serves with: uvicorn's websockets-sansio
protocol for the handshake, then the socket taken over by api.ws_connection.

Why: an idle ``/v1/ws`` socket held ~22 KiB under plain ASGI, where an SSE viewer holds
~15. After the handshake uvicorn keeps, per socket, its protocol object (websockets'
parser, the handshake's request and response), a receive ``asyncio.Queue``, two
``asyncio.Event``\\ s, a keepalive timer, and the app's task suspended in ``receive()``
through every ASGI layer. None of it is needed to carry small JSON messages in and
pre-framed batches out. Here the app accepts with the ``TAKEOVER`` extension instead of
``websocket.accept``: the protocol writes the ``101``, hands the transport to a
:class:`~tokenrelay.api.ws_connection.WebSocketConnection` with the app's handler (the
session), and the app's task ends.

The extension is offered only when the connection negotiated no WebSocket extension
(``permessage-deflate`` would change every frame per socket): an app that does not find it
accepts with ``websocket.accept`` and runs on uvicorn's protocol, as under any server.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from tokenrelay.api.ws_connection import WebSocketConnection

TAKEOVER = "tokenrelay.websocket.takeover"  # the extension's name, and its message type


class TakeoverProtocol(WebSocketsSansIOProtocol):
    """uvicorn's protocol until the app answers the handshake; then the connection's owner
    is a :class:`WebSocketConnection` if the app took it over."""

    _held: bytearray | None = None  # bytes that came after the handshake, before the answer

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app's task is created but has not run yet: the scope can still be told.
        if self.response.status_code == 101 and not self.conn.extensions:
            self.scope["extensions"][TAKEOVER] = {}
            self._held = bytearray()

    def data_received(self, data: bytes) -> None:
        # Kept unparsed until the app answers: a taken-over socket parses them itself.
        if self._held is not None:
            self._held += data
        else:
            super().data_received(data)

    async def send(self, message: Any) -> None:
        held, self._held = self._held, None
        if message["type"] != TAKEOVER:
            await super().send(message)
            if held and message["type"] == "websocket.accept" and not self.disconnected:
                super().data_received(bytes(held))  # (a refused socket's are dropped)
            return
        await super().send({"type": "websocket.accept"})  # the 101; starts uvicorn's keepalive
        if self.disconnected or self.transport.is_closing():
            raise ClientDisconnected()
        self.stop_keepalive()
        transport = self.transport
        socket = WebSocketConnection(transport, message["handler"], self.connections,
                                     self.config.ws_max_size)
        self.connections.discard(self)
        self.connections.add(socket)  # type: ignore[arg-type]  # shutdown() is all it calls
        transport.set_protocol(socket)
        # uvicorn's task closes its transport when the app returns: this object's is no
        # longer the connection. (The handshake's objects go with it.)
        self.transport = _HANDED_OVER  # type: ignore[assignment]
        socket.opened(bytes(held) if held else b"")


class _HandedOver:
    """The transport of a protocol object whose connection was taken over."""

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True


_HANDED_OVER = _HandedOver()
