"""Stream tokens: signed, scoped, expiring; anything else a client makes up is a 401."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.api.server import Api, serve
from tokenrelay.api.tokens import StreamTokens
from tokenrelay.cli.redis_server import RedisServer

KEY = "k-test"
FORGED = ["gen_x.1999999999.\u00e9", "gen_x.1999999999.\udce9", "gen_x.\u0661\u0662.abc",
          "gen_x..", "...", ""]


def test_a_token_verifies_until_it_expires_and_not_when_tampered_with() -> None:
    tokens = StreamTokens(b"secret", ttl_s=60)
    token = tokens.issue("gen_a", now=1000)
    assert tokens.verify(token, now=1000) == "gen_a"
    assert tokens.verify(token, now=1061) is None
    assert tokens.verify(token.replace("gen_a", "gen_b"), now=1000) is None


@pytest.mark.parametrize("token", FORGED)
def test_a_made_up_token_is_refused_not_raised(token: str) -> None:
    assert StreamTokens(b"secret", ttl_s=60).verify(token) is None


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[Api]:
    async with serve(redis_server, api_keys=f"acme:{KEY}") as running:
        yield running


async def test_a_non_ascii_signature_is_401_on_status_and_events(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=10,
                                 headers={"authorization": f"Bearer {KEY}"}) as client:
        gen_id = (await client.post("/v1/generations",
                                    json={"model": "fake:lorem", "prompt": "x"})).json()["id"]
    forged = f"{gen_id}.1999999999.%C3%A9"
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as anonymous:
        for path in (f"/v1/generations/{gen_id}", f"/v1/generations/{gen_id}/events"):
            response = await anonymous.get(f"{path}?token={forged}")
            assert response.status_code == 401, (path, response.text)
            assert response.json()["error"]["code"]


