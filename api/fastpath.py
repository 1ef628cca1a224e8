"""``GET /v1/generations/{id}/events`` served below the router, for long-lived SSE viewers."""

from __future__ import annotations

import re

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenrelay.api import generations
from tokenrelay.api.deps import AppState, generation_id, get_reader
from tokenrelay.shared.errors import TokenRelayError

_EVENTS_PATH = re.compile(r"^/v1/generations/([^/]+)/events$")


def _events_id(path: str) -> str | None:
    match = _EVENTS_PATH.match(path)
    return None if match is None else match[1]


class EventsFastPath:
    """ASGI middleware that serves ``GET /v1/generations/{id}/events`` below the router.

    Why: an SSE viewer lives for minutes, and every layer between uvicorn and the
    response stays suspended for as long, with its frames, exit stacks and send
    wrapper. Through FastAPI's router an idle viewer held ~23 KiB; from here (the
    innermost middleware) ~14 KiB, and each write crosses two fewer wrappers. The
    checks are the route's own functions (id, credentials, ``Last-Event-ID``,
    authorisation, viewer limit). Anything that fails them is handed to the router,
    which answers it again with the one error mapping, so errors look the same.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = None
        if scope["type"] == "http" and scope["method"] == "GET":
            # (Nothing held in this frame but what the stream needs: it lives as long.)
            raw_id = _events_id(scope["path"])
            if raw_id is not None:
                response = await _open(scope, raw_id)
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)


async def _open(scope: Scope, raw_id: str) -> Response | None:
    request = Request(scope)
    state: AppState = scope["app"].state.tr
    try:
        gen_id = await generation_id(raw_id)
        who = await get_reader(request, state, request.query_params.get("token"))
        after = generations.parse_after(request.headers.get("last-event-id"),
                                        request.query_params.get("after"))
        return await generations.open_event_stream(state, who, gen_id, after)
    except (TokenRelayError, RedisError, OSError):
        return None  # the router answers it, with the error mapping of every route
