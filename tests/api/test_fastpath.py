"""The events route served below the router (api.fastpath): same checks, same error bodies."""

from __future__ import annotations

import httpx

from tests.api.server import serve
from tokenrelay.cli.redis_server import RedisServer


async def test_errors_of_the_events_route_keep_the_error_body(redis_server: RedisServer) -> None:
    """Bad id, credentials or Last-Event-ID on the events route get the documented 4xx bodies."""
    async with serve(redis_server, api_keys="t1:k1") as api:
        auth = {"Authorization": "Bearer k1"}
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            created = await client.post("/v1/generations", headers=auth,
                                        json={"model": "fake:lorem", "prompt": "hub"})
            path = f"/v1/generations/{created.json()['id']}/events"
            cases = [
                ("/v1/generations/nope/events", auth, 404, "not_found"),
                (f"/v1/generations/gen_{'0' * 32}/events", auth, 404, "not_found"),
                (path, {}, 401, "unauthorized"),
                (path, {**auth, "Last-Event-ID": "yesterday"}, 400, "invalid_event_id"),
                (f"{path}?token=forged", {}, 401, "unauthorized"),
            ]
            for url, headers, status, code in cases:
                response = await client.get(url, headers=headers)
                assert response.status_code == status, (url, response.text)
                assert response.json()["error"]["code"] == code, (url, response.text)
        assert api.hub.viewer_count == 0 and len(api.hub.connections) == 0
