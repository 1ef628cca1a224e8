"""Stream writes against a real redis-server: fencing, exactly one terminal event, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, queue, streams


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def _new(client: Redis, gen_id: str = "gen_" + "a" * 32) -> str:
    await streams.create(client, streams.NewGeneration(gen_id, "t1", "fake:echo", {}, 1.0))
    return gen_id


def _id(base: str, n: int) -> str:
    """The id of delta ``n`` of the attempt that started at ``base`` (as a writer whose
    clock stands still at the start would choose it)."""
    return f"{ev.parse_id(base)[0]}-{n}"


async def _types(client: Redis, gen_id: str) -> list[str]:
    entries = await streams.read_after(client, gen_id, None)
    return [ev.decode_entry(eid, f).type for eid, f in entries]


async def test_create_writes_queued_status_and_first_event(client: Redis) -> None:
    """Creation leaves status queued and a first `status: queued` event with a TTL."""
    gen_id = await _new(client)
    meta, content = await streams.read_status(client, gen_id)  # type: ignore[misc]
    assert meta["status"] == "queued" and content == ""
    entries = await streams.read_after(client, gen_id, None)
    assert ev.decode_entry(*entries[0]).data == {"status": "queued"}
    assert 0 < await client.ttl(keys.events(gen_id)) <= keys.PENDING_TTL_S


async def test_stale_attempt_is_fenced(client: Redis) -> None:
    """Once attempt 2 starts, attempt 1 can neither append nor finish; the restart is announced."""
    gen_id = await _new(client)
    started, first = await streams.start(client, gen_id, 1)
    assert started
    assert await streams.append_delta(client, gen_id, _id(first, 1), {"content": "old"})
    started, second = await streams.start(client, gen_id, 2)
    assert started and ev.parse_id(second)[0] > ev.parse_id(first)[0]
    assert not await streams.append_delta(client, gen_id, _id(first, 2), {"content": "stale"})
    assert not await streams.finish(client, gen_id, 1, ev.DONE, {}, 60)
    assert await streams.append_delta(client, gen_id, _id(second, 1), {"content": "new"})
    meta, content = await streams.read_status(client, gen_id)  # type: ignore[misc]
    assert content == "new"
    entries = await streams.read_after(client, gen_id, None)
    statuses = [ev.decode_entry(*e).data.get("status") for e in entries]
    assert statuses == ["queued", "running", None, "restarted", "running", None]
    assert not (await streams.start(client, gen_id, 2))[0], "the same attempt cannot start twice"


async def test_exactly_one_terminal_event(client: Redis) -> None:
    """The first terminal write wins; later ones (any attempt, any type) are refused."""
    gen_id = await _new(client)
    _, base = await streams.start(client, gen_id, 1)
    assert await streams.finish(client, gen_id, 1, ev.DONE, {"finish_reason": "stop"}, 60,
                                {"finish_reason": "stop"})
    assert not await streams.finish(client, gen_id, 1, ev.ERROR, {}, 60)
    assert not await streams.finish(client, gen_id, None, ev.CANCELLED, {}, 60)
    assert not await streams.append_delta(client, gen_id, _id(base, 1), {"content": "late"})
    assert (await _types(client, gen_id)).count("done") == 1
    assert await _types(client, gen_id) == ["status", "status", "done"]
    assert 0 < await client.ttl(keys.events(gen_id)) <= 60
    meta, _ = await streams.read_status(client, gen_id)  # type: ignore[misc]
    assert meta["status"] == "completed" and meta["finish_reason"] == "stop"


async def test_cancel_outcomes(client: Redis) -> None:
    """Cancel: queued ends at once, running sets the flag, ended and unknown are told apart."""
    queued = await _new(client, "gen_" + "b" * 32)
    assert await streams.request_cancel(client, queued, "t1", 60) == "cancelled"
    assert await _types(client, queued) == ["status", "cancelled"]
    assert not (await streams.start(client, queued, 1))[0]

    running = await _new(client, "gen_" + "c" * 32)
    await streams.start(client, running, 1)
    assert await streams.request_cancel(client, running, "someone-else", 60) == "missing"
    assert await streams.request_cancel(client, running, "t1", 60) == "requested"
    assert await client.exists(keys.cancel(running))
    assert await streams.request_cancel(client, queued, "t1", 60) == "ended"
    assert await streams.request_cancel(client, "gen_" + "d" * 32, "t1", 60) == "missing"


async def test_read_after_is_exclusive(client: Redis) -> None:
    """read_after returns the entries strictly after the given id."""
    gen_id = await _new(client)
    _, base = await streams.start(client, gen_id, 1)
    for seq, word in enumerate(("a", "b", "c"), start=1):
        await streams.append_delta(client, gen_id, _id(base, seq), {"content": word})
    entries = await streams.read_after(client, gen_id, None)
    second = entries[1][0].decode()
    rest = await streams.read_after(client, gen_id, second)
    assert [e[0] for e in rest] == [e[0] for e in entries[2:]]


async def test_retried_append_is_not_duplicated(client: Redis) -> None:
    """Re-sending a delta with the same sequence number (a lost reply) appends it once."""
    gen_id = await _new(client)
    _, base = await streams.start(client, gen_id, 1)
    assert await streams.append_delta(client, gen_id, _id(base, 1), {"content": "a"})
    assert await streams.append_delta(client, gen_id, _id(base, 1), {"content": "a"})
    assert await streams.append_delta(client, gen_id, _id(base, 2), {"content": "b"})
    assert await streams.append_delta(client, gen_id, _id(base, 1), {"content": "a"})
    _, content = await streams.read_status(client, gen_id)  # type: ignore[misc]
    assert content == "ab"
    assert await _types(client, gen_id) == ["status", "status", "delta", "delta"]


async def test_a_retried_start_gets_the_same_base(client: Redis) -> None:
    """A start sent again by the same run (its reply was lost) answers the same base, so the
    deltas it then writes are the ones the first reply would have numbered."""
    gen_id = await _new(client)
    assert await streams.start(client, gen_id, 1, "run-a") == await streams.start(
        client, gen_id, 1, "run-a")
    assert await _types(client, gen_id) == ["status", "status"]


async def test_entries_after_deltas_are_above_them_even_if_the_clock_is_behind(
    client: Redis,
) -> None:
    """A terminal event written while the stream's last id is ahead of Redis's clock (a
    writer's estimate ahead, the same millisecond, a clock stepped back) still goes above
    it, so a late delta of the attempt is refused."""
    gen_id = await _new(client)
    _, base = await streams.start(client, gen_id, 1)
    ahead = ev.parse_id(base)[0] + 60_000
    assert await streams.append_delta(client, gen_id, f"{ahead}-5", {"content": "a"})
    assert await streams.finish(client, gen_id, 1, ev.DONE, {}, 60)
    last = (await streams.read_after(client, gen_id, None))[-1][0].decode()
    assert last == f"{ahead + 1}-0"
    assert not await streams.append_delta(client, gen_id, f"{ahead}-6", {"content": "late"})


async def test_a_delta_below_the_last_entry_is_refused_and_never_counts_as_written(
    client: Redis,
) -> None:
    """An id at or below the stream's last entry that was never written (not a retry) is
    the mark of a fenced attempt: refused, not taken for a duplicate."""
    gen_id = await _new(client)
    _, base = await streams.start(client, gen_id, 1)
    assert await streams.append_delta(client, gen_id, _id(base, 5), {"content": "a"})
    assert not await streams.append_delta(client, gen_id, _id(base, 3), {"content": "b"})
    assert await streams.append_delta(client, gen_id, _id(base, 5), {"content": "a"})
    assert (await streams.read_status(client, gen_id))[1] == "a"  # type: ignore[index]


async def test_content_is_kept_with_the_end_or_read_from_the_stream(client: Redis) -> None:
    """The text given to finish is the content; without it (a reaper's end), the content is
    the latest attempt's deltas, read from the stream."""
    given, folded = await _new(client, "gen_" + "f" * 32), await _new(client, "gen_" + "9" * 32)
    for gen_id in (given, folded):
        _, base = await streams.start(client, gen_id, 1)
        await streams.append_delta(client, gen_id, _id(base, 1), {"content": "lost "})
        _, base = await streams.start(client, gen_id, 2)
        for seq, word in enumerate(("a", "b"), start=1):
            await streams.append_delta(client, gen_id, _id(base, seq), {"content": word})
        assert (await streams.read_status(client, gen_id))[1] == "ab"  # type: ignore[index]
    assert await streams.finish(client, given, 2, ev.DONE, {}, 60, content="ab")
    assert await client.get(keys.content(given)) == b"ab"
    assert await streams.finish(client, folded, None, ev.ERROR, {}, 60)
    assert not await client.exists(keys.content(folded))
    assert (await streams.read_status(client, folded))[1] == "ab"  # type: ignore[index]


async def test_create_with_a_job_queues_it_in_the_same_transaction(
    client: Redis, redis_server: RedisServer
) -> None:
    """Creating with a job writes the generation, the arq job and its queue entry together."""
    pool = await queue.open_queue(queue.redis_settings(redis_server.url), "tr:test-queue")
    try:
        gen_id = "gen_" + "e" * 32
        job = queue.first_job(pool, gen_id)
        await streams.create(client, streams.NewGeneration(gen_id, "t1", "fake:echo", {}, 1.0),
                             job=job)
        assert await _types(client, gen_id) == ["status"]
        assert await queue.depth(pool) == 1
        assert await queue.claim(pool, "tr:test-queue", gen_id, 30) == job.score
    finally:
        await pool.aclose()


async def test_every_script_knows_the_terminal_statuses(client: Redis) -> None:
    """Each terminal status (from shared.events) stops start, finish and cancel alike."""
    for n, status in enumerate(sorted(ev.TERMINAL_STATUSES)):
        gen_id = await _new(client, f"gen_{n:032d}")
        await client.hset(keys.meta(gen_id), "status", status)
        assert await streams.start(client, gen_id, 1) == (False, status)
        assert not await streams.finish(client, gen_id, None, ev.DONE, {}, 60)
        assert await streams.request_cancel(client, gen_id, "t1", 60) == "ended"
