"""Usage accounting: usage in `done` and in the status, and per-tenant totals at GET /v1/usage."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from tests.client import collect, create, status
from tests.stack import Stack, wait_for
from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import keys, streams, usage

pytestmark = pytest.mark.slow  # starts real processes


ALICE = {"Authorization": "Bearer k-alice"}
BOB = {"Authorization": "Bearer k-bob"}
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Two tenants, room for 50 concurrent generations each, a fast fake provider."""
    s = Stack(apis=1, workers=1, env={
        "TOKENRELAY_API_KEYS": "alice:k-alice,bob:k-bob",
        "TOKENRELAY_FAKE_TPS": "100",
        "TOKENRELAY_MAX_CONCURRENT_PER_TENANT": "100",
    })
    yield s
    s.stop()


def totals(base: str, headers: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/usage", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def expected_totals(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """What /v1/usage must say: the sum over these ended generations' status bodies."""
    sums = {name: sum((s["usage"] or {}).get(name, 0) for s in statuses) for name in TOKEN_FIELDS}
    by_status = Counter(s["status"] for s in statuses)
    return {**sums, "generations": {st: by_status[st]
                                    for st in ("cancelled", "completed", "failed")}}


async def _record_fixture(redis: Redis, gen_id: str, status: str, usage_json: str | None) -> None:
    gen = streams.NewGeneration(gen_id, "t1", "fake:echo", {}, streams.now())
    await streams.create(redis, gen)
    fields = {"status": status}
    if usage_json is not None:
        fields["usage"] = usage_json
    await redis.hset(keys.meta(gen_id), mapping=fields)


async def test_record_counts_a_generation_once_however_often_called(
    redis_server: RedisServer,
) -> None:
    """Twenty concurrent and repeated records of one ended generation count it exactly once."""
    redis = Redis.from_url(redis_server.url)
    try:
        gen_id = "gen_" + "a" * 32
        await _record_fixture(redis, gen_id, "completed", json.dumps(
            {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}))
        results = await asyncio.gather(*(usage.record(redis, gen_id, 60) for _ in range(20)))
        assert results.count(True) == 1
        assert not await usage.record(redis, gen_id, 60)
        found = await usage.totals(redis, "t1")
        assert (found.prompt_tokens, found.completion_tokens, found.total_tokens) == (3, 5, 8)
        assert found.generations == {"cancelled": 0, "completed": 1, "failed": 0}
    finally:
        await redis.aclose()


async def test_record_skips_generations_that_have_not_ended(redis_server: RedisServer) -> None:
    """A queued or running generation is not counted; a failed one counts without tokens."""
    redis = Redis.from_url(redis_server.url)
    try:
        await _record_fixture(redis, "gen_" + "b" * 32, "running", None)
        assert not await usage.record(redis, "gen_" + "b" * 32, 60)
        assert not await usage.record(redis, "gen_" + "c" * 32, 60)  # unknown
        await _record_fixture(redis, "gen_" + "d" * 32, "failed", None)
        assert await usage.record(redis, "gen_" + "d" * 32, 60)
        found = await usage.totals(redis, "t1")
        assert found.total_tokens == 0
        assert found.generations == {"cancelled": 0, "completed": 0, "failed": 1}
    finally:
        await redis.aclose()


def test_usage_is_in_done_and_in_the_status(stack: Stack) -> None:
    """fake: counts words: the same usage is in the `done` event and in the status."""
    created = create(stack.url, BOB, model="fake:echo",
                     messages=[{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "one two three"}])
    done = collect(stack.url, created["id"], headers=BOB)[-1]
    expected = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert done.type == "done" and done.data["usage"] == expected
    assert status(stack.url, created["id"], BOB)["usage"] == expected


async def test_totals_equal_the_sum_over_50_concurrent_generations(stack: Stack) -> None:
    """After 50 concurrent generations (native and OpenAI, all final statuses) the totals add up."""
    rng = random.Random(5)
    base = stack.url
    before_bob = totals(base, BOB)
    assert totals(base, ALICE)["generations"] == {"cancelled": 0, "completed": 0, "failed": 0}

    async with httpx.AsyncClient(base_url=base, headers=ALICE, timeout=30) as http, \
            openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k-alice",
                               max_retries=0) as sdk:

        async def native(i: int) -> str:
            kind = i % 4
            if kind == 0:
                body = {"model": "fake:echo", "prompt": " ".join(["w"] * rng.randint(1, 30))}
            elif kind == 1:
                body = {"model": "fake:lorem", "prompt": "x", "max_tokens": rng.randint(1, 40)}
            elif kind == 2:
                body = {"model": "fake:error", "prompt": "x y"}
            else:
                body = {"model": "fake:lorem", "prompt": "x", "max_tokens": 2000}
            response = await http.post("/v1/generations", json=body)
            assert response.status_code == 202, response.text
            gen_id: str = response.json()["id"]
            if kind == 3:  # cancelled while queued or while running, whichever comes
                cancel = await http.post(f"/v1/generations/{gen_id}/cancel")
                assert cancel.status_code == 202, cancel.text
            return gen_id

        async def chat(i: int) -> str:
            completion = await sdk.chat.completions.create(
                model="fake:echo", messages=[{"role": "user", "content": f"hello number {i}"}])
            return completion.id

        ids = await asyncio.gather(*[native(i) for i in range(30)],
                                   *[chat(i) for i in range(20)])

        async def ended(gen_id: str) -> dict[str, Any]:
            while True:
                body: dict[str, Any] = (await http.get(f"/v1/generations/{gen_id}")).json()
                if body["status"] in ("completed", "failed", "cancelled"):
                    return body
                await asyncio.sleep(0.05)

        statuses = await asyncio.wait_for(asyncio.gather(*map(ended, ids)), 60)

    assert len(set(ids)) == 50
    expected = expected_totals(list(statuses))
    assert expected["generations"]["cancelled"] >= 1 and expected["generations"]["failed"] >= 1
    # A generation cancelled while queued is counted when a worker takes its job: poll.
    wait_for(lambda: totals(base, ALICE)["generations"] == expected["generations"],
             timeout=30, what="every generation counted")
    found = totals(base, ALICE)
    assert {k: found[k] for k in expected} == expected
    assert found["tenant"] == "alice"
    assert totals(base, BOB) == before_bob  # another tenant's totals did not move


def test_usage_needs_credentials(stack: Stack) -> None:
    """GET /v1/usage without a key is a 401 in the native error shape."""
    response = httpx.get(f"{stack.url}/v1/usage", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_cancel_of_a_queued_generation_is_counted_once() -> None:
    """A generation cancelled before any worker ran it is counted, once, as cancelled."""
    s = Stack(apis=1, workers=0, in_process=True)
    try:
        first = create(s.url, model="fake:echo", prompt="never runs")
        assert httpx.post(f"{s.url}/v1/generations/{first['id']}/cancel",
                          timeout=10).status_code == 202
        assert status(s.url, first["id"])["status"] == "cancelled"
        s.add_worker()
        # Then a generation that runs, so that we know the worker has taken both jobs.
        second = create(s.url, model="fake:echo", prompt="runs")
        wait_for(lambda: status(s.url, second["id"])["status"] == "completed",
                 timeout=30, what="second generation completed")
        wait_for(lambda: totals(s.url, {})["generations"]["cancelled"] == 1,
                 timeout=30, what="the cancelled generation counted")
        found = totals(s.url, {})
        assert found["generations"] == {"cancelled": 1, "completed": 1, "failed": 0}
        assert found["total_tokens"] == 2  # only the completed one used tokens
    finally:
        s.stop()
