"""The reaper against a real redis-server: a lost worker's generation restarts, or ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from arq.constants import job_key_prefix
from arq.jobs import deserialize_job
from redis.asyncio import Redis

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, limits, queue, streams, usage
from tokenrelay.shared.lifecycle import Lifecycle
from tokenrelay.worker.lease import Lease

TENANT = "t1"
QUEUE_NAME = "tr:test-queue"
MAX_ATTEMPTS = 2


@dataclass
class Reaper:
    lease: Lease
    redis: Redis
    queue: queue.Queue


@pytest.fixture
async def reaper(redis_server: RedisServer) -> AsyncIterator[Reaper]:
    redis = Redis.from_url(redis_server.url)
    pool = await queue.open_queue(queue.redis_settings(redis_server.url), QUEUE_NAME)
    lease = Lease(redis, pool, Lifecycle(redis, 60), MAX_ATTEMPTS)  # loops not started
    yield Reaper(lease, redis, pool)
    await pool.aclose()
    await redis.aclose()


async def _run_by_lost_worker(redis: Redis, gen_id: str, attempt: int) -> str:
    """A generation at ``attempt``, recorded as run by a worker whose liveness key is gone."""
    await streams.create(redis, streams.NewGeneration(gen_id, TENANT, "fake:echo", {}, 1.0))
    assert await limits.admit(redis, TENANT, gen_id, 10, 600)
    assert (await streams.start(redis, gen_id, attempt))[0]
    await redis.hset(keys.RUNNING, gen_id, f"lost-worker {attempt}")
    return gen_id


async def test_a_lost_attempt_is_queued_again(reaper: Reaper) -> None:
    """Below MAX_ATTEMPTS, the next attempt of a lost worker's generation is queued."""
    gen_id = await _run_by_lost_worker(reaper.redis, "gen_" + "a" * 32, 1)
    assert await reaper.lease.reap_once() == 1
    raw = await reaper.queue.get(job_key_prefix + queue.job_id(gen_id, 2))
    assert raw is not None and deserialize_job(raw).args == (gen_id, 2)
    meta, _ = await streams.read_status(reaper.redis, gen_id)  # type: ignore[misc]
    assert meta["status"] == ev.RUNNING


async def test_the_last_lost_attempt_ends_the_generation(reaper: Reaper) -> None:
    """At MAX_ATTEMPTS the generation ends with worker_lost, counted and released."""
    gen_id = await _run_by_lost_worker(reaper.redis, "gen_" + "b" * 32, MAX_ATTEMPTS)
    assert await reaper.lease.reap_once() == 1
    meta, _ = await streams.read_status(reaper.redis, gen_id)  # type: ignore[misc]
    assert meta["status"] == ev.FAILED and '"worker_lost"' in meta["error"]
    assert (await usage.totals(reaper.redis, TENANT)).generations[ev.FAILED] == 1
    assert await reaper.redis.zcard(keys.tenant_active(TENANT)) == 0
    assert await reaper.redis.hget(keys.RUNNING, gen_id) is None
    assert await queue.depth(reaper.queue) == 0


async def test_a_live_worker_or_a_stale_entry_is_left_alone(reaper: Reaper) -> None:
    """A generation whose worker is alive is not touched; one taken over since is forgotten."""
    alive = await _run_by_lost_worker(reaper.redis, "gen_" + "c" * 32, 1)
    await reaper.redis.hset(keys.RUNNING, alive, "live-worker 1")
    await reaper.redis.set(keys.worker_alive("live-worker"), "1", ex=10)
    taken = await _run_by_lost_worker(reaper.redis, "gen_" + "d" * 32, 1)
    assert (await streams.start(reaper.redis, taken, 2))[0]
    assert await reaper.lease.reap_once() == 0
    assert await reaper.redis.hget(keys.RUNNING, alive) == b"live-worker 1"
    assert await reaper.redis.hget(keys.RUNNING, taken) is None
    assert await queue.depth(reaper.queue) == 0
