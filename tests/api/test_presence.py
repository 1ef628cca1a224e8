"""An API process's presence (api.presence): viewer changes go to Redis in batches, one
script call per generation, kept alive by the refresh and withdrawn at stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from tokenrelay.api.presence import Presence
from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import keys, presence
from tokenrelay.shared.ids import new_generation_id


@dataclass
class Counted:
    viewers: int = 0


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def _script_calls(client: Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha"))


async def _ours(client: Redis, tracker: Presence, gen_id: str) -> int:
    """This process's count of ``gen_id`` as stored (a plain read: no script call)."""
    raw = await client.hget(keys.viewers(gen_id), f"p:{tracker.process}")
    return 0 if raw is None else int(raw.split()[0])


async def _until_counts(client: Redis, tracker: Presence, expected: dict[str, int]) -> None:
    async with asyncio.timeout(5):
        while {g: await _ours(client, tracker, g) for g in expected} != expected:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_burst_of_joins_and_leaves_is_one_write_per_generation(client: Redis) -> None:
    """Hundreds of viewer changes on three generations in one moment: three script calls,
    and the counts in Redis are the channels' counts; stop withdraws them."""
    gens = [new_generation_id() for _ in range(3)]
    for gen_id in gens:
        await client.hset(keys.meta(gen_id), "status", "running")
    channels = {gen_id: Counted() for gen_id in gens}
    tracker = Presence(client, channels, refresh_s=30, ttl_s=60, grace_s=10)
    tracker.start()
    try:
        await presence.publish(client, "warm-up", {gens[0]: 0}, 1, 1000)  # the server knows it
        before = await _script_calls(client)
        for step in range(300):
            gen_id = gens[step % 3]
            channels[gen_id].viewers += 1
            tracker.mark(gen_id)
            if step % 2:
                channels[gen_id].viewers -= 1
                tracker.mark(gen_id)
        expected = {gen_id: channels[gen_id].viewers for gen_id in gens}
        await _until_counts(client, tracker, expected)
        assert await _script_calls(client) - before == len(gens)
        assert {g: await presence.count(client, g) for g in gens} == expected
    finally:
        await tracker.stop()
    assert {g: await presence.count(client, g) for g in gens} == dict.fromkeys(gens, 0)


async def test_the_refresh_keeps_counts_alive_past_their_ttl(client: Redis) -> None:
    """Unchanged viewers are written again every refresh, so their count never expires."""
    gen_id = new_generation_id()
    await client.hset(keys.meta(gen_id), "status", "running")
    channels = {gen_id: Counted(viewers=2)}
    tracker = Presence(client, channels, refresh_s=0.2, ttl_s=0.5, grace_s=10)
    tracker.start()
    try:
        await _until_counts(client, tracker, {gen_id: 2})
        for _ in range(10):  # 1.5 s: three TTLs
            await asyncio.sleep(0.15)
            assert await presence.count(client, gen_id) == 2
    finally:
        await tracker.stop()
