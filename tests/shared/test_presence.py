"""Presence against a real redis-server: counts summed over processes, expiry, abandonment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import keys, presence
from tokenrelay.shared.ids import new_generation_id

KEEP_MS = 60_000


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def _generation(client: Redis) -> str:
    gen_id = new_generation_id()
    await client.hset(keys.meta(gen_id), "status", "running")
    return gen_id


async def _eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it returns True (fails after 5 s)."""
    async with asyncio.timeout(5):
        while not await check():  # noqa: ASYNC110 (the condition is in Redis: poll it)
            await asyncio.sleep(0.02)


async def test_counts_of_several_processes_add_up(client: Redis) -> None:
    """Each process's count of a generation adds to the total; a count of 0 withdraws it."""
    gen_id = await _generation(client)
    await presence.publish(client, "a", {gen_id: 3}, 10, KEEP_MS)
    await presence.publish(client, "b", {gen_id: 2}, 10, KEEP_MS)
    assert await presence.count(client, gen_id) == 5
    await presence.publish(client, "a", {gen_id: 0}, 10, KEEP_MS)
    assert await presence.count(client, gen_id) == 2
    await presence.publish(client, "b", {gen_id: 4}, 10, KEEP_MS)
    assert await presence.count(client, gen_id) == 4


async def test_a_count_not_refreshed_expires(client: Redis) -> None:
    """A process that stops refreshing (killed) no longer counts once its TTL has passed."""
    gen_id = await _generation(client)
    await presence.publish(client, "dead", {gen_id: 7}, 0.3, KEEP_MS)
    await presence.publish(client, "alive", {gen_id: 1}, 30, KEEP_MS)
    assert await presence.count(client, gen_id) == 8

    async def dropped() -> bool:
        return await presence.count(client, gen_id) == 1

    await _eventually(dropped)
    assert await client.pttl(keys.viewers(gen_id)) > 0  # the hash always expires


async def test_nothing_is_written_for_an_unknown_generation(client: Redis) -> None:
    """A viewer of an id that does not exist leaves no key behind."""
    gen_id = new_generation_id()
    await presence.publish(client, "a", {gen_id: 1}, 10, KEEP_MS)
    await presence.publish(client, "a", {gen_id: 0}, 10, KEEP_MS)
    assert await client.exists(keys.viewers(gen_id)) == 0
    assert await presence.count(client, gen_id) == 0


async def test_abandoned_after_the_grace_without_a_viewer(client: Redis) -> None:
    """Watched: never abandoned; unwatched: abandoned once the grace has passed since the
    last viewer (or since the first check), and then its cancel flag is set."""
    watched, left, never = [await _generation(client) for _ in range(3)]
    await presence.publish(client, "a", {watched: 1, left: 1}, 30, KEEP_MS)
    await presence.publish(client, "a", {left: 0}, 30, KEEP_MS)
    assert await presence.abandoned(client, [watched, left, never], 0.3, KEEP_MS) == []
    assert await client.hexists(keys.viewers(never), "seen")  # its grace started now

    async def both_gone() -> bool:
        found = await presence.abandoned(client, [watched, left, never], 0.3, KEEP_MS)
        assert watched not in found
        return sorted(found) == sorted([left, never])

    await _eventually(both_gone)
    assert await client.exists(keys.cancel(left), keys.cancel(never)) == 2
    assert await client.exists(keys.cancel(watched)) == 0


async def test_a_viewer_back_within_the_grace_restarts_it(client: Redis) -> None:
    """A viewer that reconnects within the grace keeps the generation from being abandoned."""
    gen_id = await _generation(client)
    await presence.publish(client, "a", {gen_id: 1}, 30, KEEP_MS)
    await presence.publish(client, "a", {gen_id: 0}, 30, KEEP_MS)
    await presence.publish(client, "b", {gen_id: 1}, 30, KEEP_MS)
    assert await presence.abandoned(client, [gen_id], 0.0, KEEP_MS) == []
    await presence.publish(client, "b", {gen_id: 0}, 30, KEEP_MS)
    assert await presence.abandoned(client, [gen_id], 3600, KEEP_MS) == []
    assert await presence.abandoned(client, [gen_id], 0.0, KEEP_MS) == [gen_id]
