"""TOKENRELAY_FAKE_MODELS=false through the HTTP doors: refused, unlisted, nothing created."""

from __future__ import annotations

import httpx

from tests.api.server import serve
from tokenrelay.cli.redis_server import RedisServer


async def test_fake_models_off_are_refused_and_unlisted(redis_server: RedisServer) -> None:
    async with serve(redis_server, fake_models=False) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            keys_before = await api.redis.dbsize()
            native = await client.post("/v1/generations",
                                       json={"model": "fake:echo", "prompt": "x"})
            chat = await client.post("/v1/chat/completions", json={
                "model": "fake:echo", "messages": [{"role": "user", "content": "x"}]})
            listed = (await client.get("/v1/models")).json()["data"]
            assert await api.redis.dbsize() == keys_before
    assert native.status_code == 400 and "turned off" in native.json()["error"]["message"]
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
    assert not [m for m in listed if m["id"].startswith("fake:")]
