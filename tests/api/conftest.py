"""Fixtures of the read side's tests: an in-process API server on a private Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api.server import HTTP_PROTOCOLS, Api, serve
from tokenrelay.cli.redis_server import RedisServer


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[Api]:
    """One API (heartbeat 0.2 s, send timeout 0.5 s) on a private redis-server, no worker."""
    async with serve(redis_server, heartbeat_s=0.2, send_timeout_s=0.5) as running:
        yield running


@pytest.fixture(params=list(HTTP_PROTOCOLS))
async def either_api(request: pytest.FixtureRequest,
                     redis_server: RedisServer) -> AsyncIterator[tuple[Api, str]]:
    """The same, served with uvicorn's HTTP protocol or with ``tokenrelay api``'s."""
    async with serve(redis_server, http=HTTP_PROTOCOLS[request.param], heartbeat_s=0.2,
                     send_timeout_s=0.5) as running:
        yield running, request.param


@pytest.fixture
async def direct_api(redis_server: RedisServer) -> AsyncIterator[Api]:
    """The ``api`` fixture served with ``tokenrelay api``'s protocol: SSE streams take their
    connection over."""
    async with serve(redis_server, http=HTTP_PROTOCOLS["tokenrelay api"], heartbeat_s=0.2,
                     send_timeout_s=0.5) as running:
        yield running
