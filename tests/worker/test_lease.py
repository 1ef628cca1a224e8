"""The reaper against a real redis-server: a lost worker's generation restarts, or ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from arq.constants import job_key_prefix
from arq.jobs import deserialize_job
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, limits, queue, streams, usage
from tokenrelay.shared.lifecycle import Lifecycle
from tokenrelay.shared.redis import create_redis
from tokenrelay.worker.lease import (
    ALIVE_TTL_S,
    LIMIT_MARGIN_S,
    REAP_EVERY_S,
    SUSPECT_GRACE_S,
    Lease,
    RedisClock,
)

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
    # Loops not started, and no grace: each reap_once acts on what it sees.
    lease = Lease(redis, pool, Lifecycle(redis, 60), MAX_ATTEMPTS, grace_s=0)
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


async def test_a_missing_key_is_only_suspect_until_the_grace_has_passed(reaper: Reaper) -> None:
    """A worker whose key reappears within the grace keeps its generation; one whose key
    stays missing for the grace is lost."""
    lease = Lease(reaper.redis, reaper.queue, Lifecycle(reaper.redis, 60), MAX_ATTEMPTS,
                  grace_s=0.3)
    gen_id = await _run_by_lost_worker(reaper.redis, "gen_" + "e" * 32, 1)
    assert await lease.reap_once() == 0  # suspect
    await reaper.redis.set(keys.worker_alive("lost-worker"), "1", ex=10)  # it renews
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        assert await lease.reap_once() == 0
    await reaper.redis.delete(keys.worker_alive("lost-worker"))  # now it is gone for good
    assert await lease.reap_once() == 0  # a new suspicion, not the old one
    assert await _poll(lambda: lease.reap_once(), deadline_s=5) == 1
    assert await reaper.queue.get(job_key_prefix + queue.job_id(gen_id, 2)) is not None


async def test_a_lost_attempt_stops_counting_against_the_queue(reaper: Reaper) -> None:
    """The lost attempt's job leaves the queue when the next one is queued."""
    gen_id = await _run_by_lost_worker(reaper.redis, "gen_" + "f" * 32, 1)
    await queue.enqueue(reaper.queue, queue.first_job(reaper.queue, gen_id))
    assert await queue.depth(reaper.queue) == 1
    assert await reaper.lease.reap_once() == 1
    assert await queue.depth(reaper.queue) == 1  # the second attempt only
    assert await reaper.queue.get(job_key_prefix + gen_id) is None


async def test_a_redis_outage_does_not_look_like_a_lost_worker(tmp_path: Path) -> None:
    """Redis (AOF) down for longer than the liveness TTL: every liveness key has expired
    when it returns. Another worker's reaper pass that happens to run before the live
    owners renew (the race a real deployment loses now and then) must leave their
    generations alone, and so must its later passes: nothing restarts, no attempt is spent."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    redis = Redis.from_url(server.url)
    pool = await queue.open_queue(queue.redis_settings(server.url), QUEUE_NAME)
    # Each worker has its own client, made as worker processes make theirs.
    clients = [create_redis(server.url, "worker", patient=True) for _ in range(9)]
    owners = [Lease(c, pool, Lifecycle(c, 60), MAX_ATTEMPTS) for c in clients[:8]]
    other = Lease(clients[8], pool, Lifecycle(clients[8], 60), MAX_ATTEMPTS)
    gen_ids = [f"gen_{i}" + "9" * 31 for i in range(8)]
    try:
        for owner, gen_id in zip(owners, gen_ids, strict=True):
            await _run_by_lost_worker(redis, gen_id, 1)
            await owner.hold(gen_id, 1)
            owner.start()
        for owner in owners:
            assert await _poll(lambda o=owner: redis.exists(keys.worker_alive(o.worker_id)), 5)
        server._terminate()
        # The outage itself (not a wait for a condition): longer than the liveness TTL.
        await asyncio.sleep(ALIVE_TTL_S + 1)
        server.start()
        # The worst case, made certain: a reaper pass before any owner has renewed.
        assert await other.reap_once() == 0
        other.start()
        # Watch for longer than the grace plus a few reaper passes.
        deadline = time.monotonic() + SUSPECT_GRACE_S + 3 * REAP_EVERY_S
        while time.monotonic() < deadline:
            with contextlib.suppress(RedisError, OSError):
                for gen_id in gen_ids:
                    assert await redis.exists(job_key_prefix + queue.job_id(gen_id, 2)) == 0
                    assert await redis.hget(keys.meta(gen_id), "attempt") == b"1"
            await asyncio.sleep(0.05)
        for owner, gen_id in zip(owners, gen_ids, strict=True):
            assert await redis.hget(keys.RUNNING, gen_id) == f"{owner.worker_id} 1".encode()
    finally:
        for lease in [*owners, other]:
            await lease.stop()
        for client in clients:
            await client.aclose()
        await pool.aclose()
        await redis.aclose()
        server.stop()


async def _poll(check: Callable[[], Awaitable[Any]], deadline_s: float) -> Any:
    """The first truthy result of ``check`` within the deadline (else the last one)."""
    deadline = time.monotonic() + deadline_s
    result = None
    while time.monotonic() < deadline:
        with contextlib.suppress(RedisError, OSError):
            result = await check()
            if result:
                break
        await asyncio.sleep(0.05)
    return result


async def test_the_clock_keeps_delta_ids_below_the_liveness_keys_expiry(
    redis_server: RedisServer,
) -> None:
    """A renewal reads Redis's time with the key: the clock follows Redis's time, and the
    limit of its deltas' ids is at least the margin before the key expires (by Redis's
    clock), so a takeover after the expiry writes above them."""
    client = Redis.from_url(redis_server.url)
    try:
        clock = RedisClock()
        await clock.renew(client, "tr:test:alive", ALIVE_TTL_S)
        seconds, micros = await client.time()
        now_ms = seconds * 1000 + micros // 1000
        expires_ms = now_ms + await client.pttl("tr:test:alive")
        assert clock.limit_ms <= expires_ms - LIMIT_MARGIN_S * 1000 + 1
        assert abs(clock.now_ms() - now_ms) <= 50
    finally:
        await client.aclose()
