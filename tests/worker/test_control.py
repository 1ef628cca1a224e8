"""The worker's control loop (worker.control) against a real redis-server: an abandoned
generation is cancelled like any other, a watched one is not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import keys, presence
from tokenrelay.shared.ids import new_generation_id
from tokenrelay.worker.control import Control


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def test_only_the_abandoned_generation_is_cancelled(client: Redis) -> None:
    """Of two generations with on_disconnect cancel, the one with a viewer keeps running;
    the other gets its cancel flag and its cancel event once the grace has passed."""
    watched, abandoned = new_generation_id(), new_generation_id()
    for gen_id in (watched, abandoned):
        await client.hset(keys.meta(gen_id), "status", "running")
    await presence.publish(client, "api-1", {watched: 1}, 60, 120_000)
    control = Control(client, abandon_grace_s=0.3, presence_ttl_s=60)
    events = {gen_id: control.watch(gen_id) for gen_id in (watched, abandoned)}
    for gen_id in events:
        control.watch_presence(gen_id)
    control.start()
    try:
        await asyncio.wait_for(events[abandoned].wait(), 5)
        assert not events[watched].is_set()
        assert control.abandoned == {abandoned}
        assert await client.exists(keys.cancel(abandoned)) == 1
        assert await client.exists(keys.cancel(watched)) == 0
    finally:
        await control.stop()
    control.unwatch_presence(abandoned)
    assert control.abandoned == set()
