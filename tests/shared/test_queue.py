"""The job queue against a real redis-server: jobs as arq's worker reads them, slots, claims."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import deserialize_job

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import keys, queue

QUEUE_NAME = "tr:test-queue"
GEN = "gen_" + "a" * 32


@pytest.fixture
async def pool(redis_server: RedisServer) -> AsyncIterator[queue.Queue]:
    q = await queue.open_queue(queue.redis_settings(redis_server.url), QUEUE_NAME)
    yield q
    await q.aclose()


async def _next_message(pubsub: object, within: float = 5.0) -> dict[str, object]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        message = await pubsub.get_message(timeout=0.1)  # type: ignore[attr-defined]
        if message is not None:
            return dict(message)
    raise AssertionError("no wake-up published")


async def test_a_job_added_in_a_transaction_is_what_arq_reads(pool: queue.Queue) -> None:
    """``add`` writes the record arq's worker decodes (our job name, the generation id),
    puts it in the queue due now, and publishes the wake-up, in one MULTI."""
    pubsub = pool.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.WAKE_CHANNEL)
    try:
        job = queue.first_job(pool, GEN)
        async with pool.pipeline(transaction=True) as pipe:
            queue.add(pipe, job)
            await pipe.execute()
        raw = await pool.get(job_key_prefix + GEN)
        assert raw is not None
        stored = deserialize_job(raw)
        assert (stored.function, stored.args, stored.kwargs) == (queue.JOB_NAME, (GEN,), {})
        score = await pool.zscore(QUEUE_NAME, GEN)
        assert score is not None and abs(score - time.time() * 1000) < 5000
        assert 0 < await pool.pttl(job_key_prefix + GEN) <= pool.expires_extra_ms
        assert (await _next_message(pubsub))["data"] == GEN.encode()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_a_full_queue_refuses_a_reservation(pool: queue.Queue) -> None:
    """A reservation takes a place only while the queue holds fewer jobs than the limit;
    giving one back frees its place."""
    assert await queue.reserve_slot(pool, "gen_1", 2)
    assert await queue.reserve_slot(pool, "gen_2", 2)
    assert not await queue.reserve_slot(pool, "gen_3", 2)
    assert await queue.depth(pool) == 2
    await queue.release_slot(pool, "gen_1")
    assert await queue.depth(pool) == 1
    assert await queue.reserve_slot(pool, "gen_3", 2)


async def test_a_reserved_place_is_claimed_only_once_its_job_is_written(
    pool: queue.Queue,
) -> None:
    """A reservation is not due (no worker takes a job not yet written); once the job is
    enqueued it is claimed exactly once, and its in-progress key is set."""
    assert await queue.reserve_slot(pool, GEN, 10)
    assert await queue.claim(pool, QUEUE_NAME, GEN, 30) is None
    job = queue.first_job(pool, GEN)
    await queue.enqueue(pool, job)
    claims = await asyncio.gather(*(queue.claim(pool, QUEUE_NAME, GEN, 30) for _ in range(5)))
    assert claims.count(job.score) == 1 and claims.count(None) == 4
    assert 0 < await pool.pttl(in_progress_key_prefix + GEN) <= 30_000


async def test_a_claim_of_an_unknown_job_fails(pool: queue.Queue) -> None:
    """A job that is not in the queue (finished, or never queued) cannot be claimed."""
    assert await queue.claim(pool, QUEUE_NAME, "gen_missing", 30) is None


async def test_a_later_attempt_is_its_own_job(pool: queue.Queue) -> None:
    """Attempt 2 is queued under a suffixed job id, calls the job with the attempt, and
    wakes the workers; queueing it twice leaves one job."""
    pubsub = pool.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.WAKE_CHANNEL)
    try:
        await queue.enqueue_attempt(pool, GEN, 2)
        await queue.enqueue_attempt(pool, GEN, 2)
        job_id = queue.job_id(GEN, 2)
        assert job_id != GEN and queue.job_id(GEN, 1) == GEN
        raw = await pool.get(job_key_prefix + job_id)
        assert raw is not None
        stored = deserialize_job(raw)
        assert (stored.function, stored.args) == (queue.JOB_NAME, (GEN, 2))
        assert await pool.zrange(QUEUE_NAME, 0, -1) == [job_id.encode()]
        assert (await _next_message(pubsub))["data"] == GEN.encode()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
