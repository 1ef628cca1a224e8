"""Ending a generation against a real redis-server: one terminal event, bookkeeping once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, lifecycle, limits, stats, streams, usage
from tokenrelay.shared.lifecycle import Lifecycle, Timing

TENANT = "t1"
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def _running(client: Redis, gen_id: str) -> str:
    """A generation admitted for its tenant and started by attempt 1."""
    await streams.create(client, streams.NewGeneration(gen_id, TENANT, "fake:echo", {},
                                                       streams.now()))
    assert await limits.admit(client, TENANT, gen_id, 10, 600)
    assert (await streams.start(client, gen_id, 1))[0]
    return gen_id


async def _holds_slot(client: Redis, gen_id: str) -> bool:
    return await client.zscore(keys.tenant_active(TENANT), gen_id) is not None


async def test_end_writes_one_terminal_event_and_does_the_bookkeeping_once(
    client: Redis,
) -> None:
    """The first end writes ``done``, counts usage and statistics and frees the slot;
    later ends (any type) change nothing."""
    gen_id = await _running(client, "gen_" + "a" * 32)
    ends = Lifecycle(client, retention_s=60)
    now = time.time()
    timing = Timing(created=now - 0.5, started=now - 0.4, first_delta=now - 0.3)
    assert await ends.end(gen_id, 1, lifecycle.done("stop", USAGE), timing)
    assert not await ends.end(gen_id, 1, lifecycle.failed("x", "late", retryable=False))
    assert not await ends.end(gen_id, None, lifecycle.cancelled())

    entries = await streams.read_after(client, gen_id, None)
    types = [ev.decode_entry(*e).type for e in entries]
    assert [t for t in types if t in ev.TERMINAL_TYPES] == [ev.DONE]
    meta, _ = await streams.read_status(client, gen_id)  # type: ignore[misc]
    assert meta["status"] == ev.COMPLETED and meta["finish_reason"] == "stop"
    totals = await usage.totals(client, TENANT)
    assert (totals.total_tokens, totals.generations[ev.COMPLETED]) == (8, 1)
    assert not await _holds_slot(client, gen_id)
    snap = await stats.snapshot(client)
    assert snap["generations:completed"] == 1 and "generations:failed" not in snap
    assert snap["time_to_first_token_seconds:count"] == 1
    assert snap["queue_wait_seconds:count"] == 1
    assert snap["tokens_per_second:count"] == 1


async def test_a_stale_attempt_ends_nothing(client: Redis) -> None:
    """After attempt 2 started, attempt 1's end is refused and leaves all bookkeeping alone."""
    gen_id = await _running(client, "gen_" + "b" * 32)
    assert (await streams.start(client, gen_id, 2))[0]
    ends = Lifecycle(client, retention_s=60)
    assert not await ends.end(gen_id, 1, lifecycle.failed("worker_lost", "lost",
                                                          retryable=True))
    meta, _ = await streams.read_status(client, gen_id)  # type: ignore[misc]
    assert meta["status"] == ev.RUNNING
    assert await _holds_slot(client, gen_id)
    assert (await usage.totals(client, TENANT)).generations[ev.FAILED] == 0
    assert await stats.snapshot(client) == {}


async def test_an_error_ending_is_counted_by_code_and_stored_as_the_status_error(
    client: Redis,
) -> None:
    """``failed`` writes an ``error`` event whose data is also the status's ``error``."""
    gen_id = await _running(client, "gen_" + "c" * 32)
    ends = Lifecycle(client, retention_s=60)
    assert await ends.end(gen_id, 1, lifecycle.failed("upstream_error", "boom", retryable=True))
    entries = await streams.read_after(client, gen_id, None)
    last = ev.decode_entry(*entries[-1])
    assert (last.type, last.data) == (ev.ERROR, {"code": "upstream_error", "message": "boom",
                                                 "retryable": True})
    meta, _ = await streams.read_status(client, gen_id)  # type: ignore[misc]
    assert meta["status"] == ev.FAILED and ev.dumps(last.data) == meta["error"]
    snap = await stats.snapshot(client)
    assert snap["generations:failed"] == 1 and snap["errors:upstream_error"] == 1


async def test_settle_counts_a_generation_ended_elsewhere_once(client: Redis) -> None:
    """A generation cancelled while queued is settled (usage, slot) however often asked."""
    gen_id = "gen_" + "d" * 32
    await streams.create(client, streams.NewGeneration(gen_id, TENANT, "fake:echo", {}, 1.0))
    assert await limits.admit(client, TENANT, gen_id, 10, 600)
    assert await streams.request_cancel(client, gen_id, TENANT, 60) == "cancelled"
    ends = Lifecycle(client, retention_s=60)
    await asyncio.gather(*(ends.settle(gen_id) for _ in range(5)))
    assert (await usage.totals(client, TENANT)).generations[ev.CANCELLED] == 1
    assert not await _holds_slot(client, gen_id)


async def test_end_finishes_its_write_when_the_caller_is_cancelled(client: Redis) -> None:
    """A caller cancelled mid-end still leaves the terminal event and its bookkeeping."""
    gen_id = await _running(client, "gen_" + "e" * 32)
    ends = Lifecycle(client, retention_s=60)
    task = asyncio.create_task(ends.end(gen_id, 1, lifecycle.cancelled()))
    await asyncio.sleep(0)  # let it send its first command
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 5
    while await _holds_slot(client, gen_id):
        assert time.monotonic() < deadline, "the shielded end did not complete"
        await asyncio.sleep(0.01)
    meta, _ = await streams.read_status(client, gen_id)  # type: ignore[misc]
    assert meta["status"] == ev.CANCELLED
    assert (await usage.totals(client, TENANT)).generations[ev.CANCELLED] == 1
