"""The /v1/ws handshake (api.routes.ws): browser origins, and the viewer limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.api.server import Api, serve
from tokenrelay.api.routes.ws import origin_allowed
from tokenrelay.cli.redis_server import RedisServer

LISTED = frozenset({"https://app.example.com"})


@pytest.mark.parametrize(("origin", "host", "allowed", "expected"), [
    ("http://127.0.0.1:8000", "127.0.0.1:8000", frozenset(), True),  # same origin
    ("HTTPS://API.example.com", "api.example.com", frozenset(), True),
    ("https://api.example.com", "api.example.com:8443", frozenset(), False),  # another port
    ("https://app.example.com/", "api.example.com", LISTED, True),  # listed (slash ignored)
    ("https://evil.example.com", "api.example.com", LISTED, False),
    ("null", "api.example.com", frozenset(), False),  # a sandboxed page or a file
    ("http://[::1", "api.example.com", frozenset(), False),  # not a URL
    ("https://anything.test", "api.example.com", frozenset({"*"}), True),
])
def test_origin_allowed(origin: str, host: str, allowed: frozenset[str], expected: bool) -> None:
    """Same origin by host and port, else listed in WS_ALLOWED_ORIGINS, else refused."""
    assert origin_allowed(origin, host, allowed) is expected


@pytest.fixture
async def one_viewer(redis_server: RedisServer) -> AsyncIterator[Api]:
    """An API that serves one viewer at most."""
    async with serve(redis_server, max_viewers_per_process=1) as running:
        yield running


async def test_a_socket_past_the_viewer_limit_is_refused_with_503(one_viewer: Api) -> None:
    """At MAX_VIEWERS_PER_PROCESS the handshake is answered 503 with Retry-After (another
    instance will do), in the native error shape; the open socket is unaffected."""
    url = one_viewer.url.replace("http://", "ws://") + "/v1/ws"
    async with connect(url) as first:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        response = refused.value.response
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert b'"code":"overloaded"' in response.body
        await first.send('{"type":"ping"}')
        assert await first.recv() == '{"type":"pong"}'


async def test_a_plain_http_request_is_426(one_viewer: Api) -> None:
    """GET /v1/ws without the upgrade: 426 Upgrade Required, in the native error shape."""
    async with httpx.AsyncClient(base_url=one_viewer.url) as http:
        response = await http.get("/v1/ws")
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert response.json()["error"]["code"] == "upgrade_required"
