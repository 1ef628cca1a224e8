"""``GET /v1/ws``: the WebSocket handshake (origin, credentials, capacity), then a session.

Checked before the socket is accepted, each refused with an HTTP answer in the native
error shape: the browser's ``Origin`` (403; RFC 6455 §10.2: neither uvicorn nor
Starlette checks it), credentials given in the handshake (401: an ``Authorization:
Bearer`` key, or a stream token as ``?token=``), and the process's viewer limit (503).
A socket without credentials is accepted: it authenticates with an ``auth`` message
(browsers cannot set headers on a WebSocket).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from tokenrelay.api.deps import AppState, bearer_tenant
from tokenrelay.api.errors import Failure, native_shape
from tokenrelay.api.ws_asgi import run_asgi
from tokenrelay.api.ws_session import Session
from tokenrelay.api.ws_transport import TAKEOVER

PATH = "/v1/ws"


class WebSocketDoor:
    """ASGI middleware that serves the ``/v1/ws`` WebSocket below the router.

    As for SSE viewers (api.fastpath): a socket lives for minutes and every layer above
    it stays suspended as long, unless the server takes the socket over
    (api.ws_transport), when the app's task ends at the accept.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("websocket", "http") or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":  # a plain request for the socket's path
            _, body = native_shape(Failure(426, "upgrade_required", f"{PATH} is a WebSocket: "
                                           "connect with Upgrade: websocket"))
            response = JSONResponse(body, status_code=426, headers={"Upgrade": "websocket"})
            await response(scope, receive, send)
            return
        await serve(WebSocket(scope, receive, send), send)


async def serve(websocket: WebSocket, send: Send) -> None:
    """Check the handshake; accept, and hand the socket to its session: taken over by the
    server when it can (the session then runs on its callbacks), else read here to its end."""
    state: AppState = websocket.app.state.tr
    refusal = _refusal(state, websocket)
    if refusal is not None:
        _, body = native_shape(refusal)
        headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
        await websocket.send_denial_response(
            JSONResponse(body, status_code=refusal.status, headers=headers))
        return
    tenant = bearer_tenant(websocket, state)
    token = websocket.query_params.get("token")
    grants = None
    if token:
        granted = state.tokens.verify(token)
        assert granted is not None  # checked by _refusal
        grants = {granted}
    if TAKEOVER in websocket.scope.get("extensions", {}):
        await send({"type": TAKEOVER, "handler": Session(state, tenant, grants, None)})
        return
    await websocket.accept()
    await run_asgi(Session(state, tenant, grants, asyncio.current_task()), websocket)


def _refusal(state: AppState, websocket: WebSocket) -> Failure | None:
    origin = websocket.headers.get("origin")
    if origin is not None and not origin_allowed(origin, websocket.headers.get("host", ""),
                                                 state.settings.ws_origins()):
        return Failure(403, "forbidden", f"origin {origin} may not open this WebSocket "
                       "(TOKENRELAY_WS_ALLOWED_ORIGINS)")
    if "authorization" in websocket.headers and bearer_tenant(websocket, state) is None:
        return Failure(401, "unauthorized", "invalid API key (Authorization: Bearer KEY)")
    token = websocket.query_params.get("token")
    if token and state.tokens.verify(token) is None:
        return Failure(401, "unauthorized", "invalid or expired stream token")
    if len(state.hub.connections) >= state.settings.max_viewers_per_process:
        return Failure(503, "overloaded", "this API process is at its viewer limit; "
                       "retry (any instance)", retry_after=1)
    return None


def origin_allowed(origin: str, host: str, allowed: frozenset[str]) -> bool:
    """Same origin (the ``Origin``'s host and port are the request's ``Host``), or listed
    in WS_ALLOWED_ORIGINS (``*``: any)."""
    normalized = origin.strip().rstrip("/").lower()
    if "*" in allowed or normalized in allowed:
        return True
    try:
        netloc = urlsplit(normalized).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc == host.strip().lower()
