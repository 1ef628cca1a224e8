"""Thread storage against a real redis-server: the atomic claim, the end hook, delete, listing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, streams
from tokenrelay.shared import threads as store
from tokenrelay.shared.ids import new_generation_id

TENANT = "t1"
TTL = 3600


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


class Starts:
    """A fake queue: records the generations whose job was put on it."""

    def __init__(self, fail: int = 0):
        self.started: list[str] = []
        self.fail = fail

    async def __call__(self, gen_id: str) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("queue unreachable")
        self.started.append(gen_id)


async def _thread(client: Redis, system: str = "be brief", budget: int = 10_000) -> str:
    thread = await store.create(client, TENANT, system=system, model="fake:echo", metadata=None,
                                retention_s=TTL)
    await client.hset(keys.thread_meta(thread.id), "budget", budget)
    return thread.id


async def _post(client: Redis, thread_id: str, content: str, if_busy: str = "reject",
                budget: int = 10_000) -> tuple[str, store.Claim]:
    """What the API does for a message: record a generation of the thread, then claim."""
    gen_id = new_generation_id()
    request = {"model": "fake:echo", "messages": [], "max_tokens": None, "temperature": None,
               "extra": {}}
    await streams.create(client, streams.NewGeneration(gen_id, TENANT, "fake:echo", request,
                                                       streams.now()),
                         metadata={"thread_id": thread_id})
    turn = store.Turn(store.new_message_id(), store.new_message_id(), content, streams.now(),
                      gen_id, "fake:echo")
    claim = await store.claim(client, thread_id, TENANT, turn, if_busy, retention_s=TTL,
                              context_chars=budget)
    return gen_id, claim


async def _finish(client: Redis, gen_id: str, text: str, event: str = ev.DONE) -> None:
    """What a worker does: run the generation to its terminal event."""
    started, base = await streams.start(client, gen_id, 1)
    assert started
    if text:
        assert await streams.append_delta(client, gen_id, f"{base.split('-')[0]}-1",
                                          {"content": text})
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    fields = {"usage": json.dumps(usage), "finish_reason": "stop"} if event == ev.DONE else {}
    assert await streams.finish(client, gen_id, 1, event, {}, 60, fields)


async def _snapshot(client: Redis, thread_id: str) -> dict[str, Any]:
    """Every key of the thread with its content (TTLs aside)."""
    out: dict[str, Any] = {}
    for key in keys.thread_keys(thread_id):
        kind = (await client.type(key)).decode()
        if kind == "hash":
            out[key] = await client.hgetall(key)
        elif kind == "list":
            out[key] = await client.lrange(key, 0, -1)
    return out


async def _request(client: Redis, gen_id: str) -> dict[str, Any]:
    meta, _ = await streams.read_status(client, gen_id)  # type: ignore[misc]
    return {"request": json.loads(meta["request"]), "metadata": json.loads(meta["metadata"])}


def test_context_keeps_the_system_prompt_and_the_newest_turns_that_fit() -> None:
    """The budget drops the oldest turns first, counts them, and always sends system and the new message."""
    earlier = [("q1" * 10, "a1" * 10), ("q2", ""), ("q3", "a3")]
    messages, dropped = store.build_context("sys", earlier, "now", budget=20)
    assert dropped == 1
    assert messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q2"},  # cancelled before its first word: question alone
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3"},
        {"role": "user", "content": "now"},
    ]
    assert store.build_context("", earlier, "now", budget=1) == (
        [{"role": "user", "content": "now"}], 3)


async def test_create_and_load_round_trip_with_a_ttl(client: Redis) -> None:
    """A new thread is readable, listed, and every key it has expires."""
    thread_id = await _thread(client)
    thread = await store.load(client, thread_id)
    assert thread is not None and thread.tenant == TENANT and thread.system == "be brief"
    assert thread.turns == [] and thread.active is None
    assert 0 < await client.ttl(keys.thread_meta(thread_id)) <= TTL
    listed, _ = await store.list_threads(client, TENANT, 10)
    assert [t.id for t in listed] == [thread_id]


async def test_reject_while_busy_changes_nothing(client: Redis) -> None:
    """The first message takes the slot; a second with reject is refused and leaves the thread as it was."""
    thread_id = await _thread(client)
    first, claim = await _post(client, thread_id, "hello")
    assert claim.outcome == "start"
    before = await _snapshot(client, thread_id)
    _, claim = await _post(client, thread_id, "again")
    assert (claim.outcome, claim.active) == ("busy", first)
    assert await _snapshot(client, thread_id) == before


async def test_concurrent_claims_start_exactly_one(redis_server: RedisServer) -> None:
    """Twenty claims on twenty connections at once: exactly one takes the slot."""
    setup = Redis.from_url(redis_server.url)
    thread_id = await _thread(setup)
    clients = [Redis.from_url(redis_server.url) for _ in range(20)]
    try:
        results = await asyncio.gather(*(_post(c, thread_id, f"m{i}")
                                         for i, c in enumerate(clients)))
        outcomes = sorted(claim.outcome for _, claim in results)
        assert outcomes == ["busy"] * 19 + ["start"]
        thread = await store.load(setup, thread_id)
        assert thread is not None and len(thread.turns) == 1
    finally:
        for c in [setup, *clients]:
            await c.aclose()


async def test_end_records_the_answer_and_starts_the_next_with_it_in_context(
    client: Redis,
) -> None:
    """An enqueued message starts when the active one ends, with that answer in its context."""
    thread_id = await _thread(client)
    first, _ = await _post(client, thread_id, "one")
    second, claim = await _post(client, thread_id, "two", "enqueue")
    assert claim.outcome == "queued"
    starts = Starts()
    await _finish(client, first, "answer one")
    await store.on_generation_end(client, first, starts)
    assert starts.started == [second]
    thread = await store.load(client, thread_id)
    assert thread is not None and thread.active == second
    assert thread.replies[first].content == "answer one"
    assert thread.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    sent = await _request(client, second)
    assert sent["request"]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": "two"},
    ]
    assert sent["metadata"] == {"thread_id": thread_id, "context_dropped_turns": "0"}


async def test_end_hook_is_idempotent(client: Redis) -> None:
    """Calling the end hook again changes nothing and starts nothing."""
    thread_id = await _thread(client)
    first, _ = await _post(client, thread_id, "one")
    await _post(client, thread_id, "two", "enqueue")
    starts = Starts()
    await _finish(client, first, "answer one")
    await store.on_generation_end(client, first, starts)
    before = await _snapshot(client, thread_id)
    await store.on_generation_end(client, first, starts)
    assert await _snapshot(client, thread_id) == before
    assert len(starts.started) == 1


async def test_a_retried_end_hook_completes_a_start_that_failed(client: Redis) -> None:
    """If the hook died after passing the slot but before queueing the next job, its retry queues it."""
    thread_id = await _thread(client)
    first, _ = await _post(client, thread_id, "one")
    second, _ = await _post(client, thread_id, "two", "enqueue")
    await _finish(client, first, "answer one")
    starts = Starts(fail=1)
    with pytest.raises(ConnectionError):
        await store.on_generation_end(client, first, starts)
    await store.on_generation_end(client, first, starts)
    assert starts.started == [second]


async def test_a_generation_outside_threads_is_ignored(client: Redis) -> None:
    """The hook does nothing for a generation that is not a thread's."""
    gen_id = new_generation_id()
    await streams.create(client, streams.NewGeneration(gen_id, TENANT, "fake:echo", {}, 1.0))
    await _finish(client, gen_id, "x")
    keys_before = set(await client.keys("*"))
    await store.on_generation_end(client, gen_id, Starts())
    assert set(await client.keys("*")) == keys_before


async def test_a_generation_naming_a_thread_it_was_not_posted_to_is_ignored(
    client: Redis,
) -> None:
    """A generation whose metadata names a thread, but that no claim put there, changes nothing."""
    thread_id = await _thread(client)
    await _post(client, thread_id, "one")
    stranger = new_generation_id()
    await streams.create(client, streams.NewGeneration(stranger, "t2", "fake:echo", {}, 1.0),
                         metadata={"thread_id": thread_id})
    await _finish(client, stranger, "injected")
    before = await _snapshot(client, thread_id)
    await store.on_generation_end(client, stranger, Starts())
    assert await _snapshot(client, thread_id) == before


async def test_an_enqueued_message_cancelled_while_waiting_is_skipped(client: Redis) -> None:
    """A waiting generation cancelled by id is recorded as cancelled, and the one after it runs."""
    thread_id = await _thread(client)
    first, _ = await _post(client, thread_id, "one")
    second, _ = await _post(client, thread_id, "two", "enqueue")
    third, _ = await _post(client, thread_id, "three", "enqueue")
    assert await streams.request_cancel(client, second, TENANT, 60) == "cancelled"
    starts = Starts()
    await _finish(client, first, "answer one")
    await store.on_generation_end(client, first, starts)
    assert starts.started == [third]
    thread = await store.load(client, thread_id)
    assert thread is not None and thread.replies[second].status == ev.CANCELLED
    assert [t.generation_id for t in thread.turns] == [first, second, third]


async def test_interrupt_replaces_the_waiting_messages(client: Redis) -> None:
    """interrupt names the active generation and the enqueued ones it replaces, and waits alone."""
    thread_id = await _thread(client)
    first, _ = await _post(client, thread_id, "one")
    second, _ = await _post(client, thread_id, "two", "enqueue")
    third, claim = await _post(client, thread_id, "three", "interrupt")
    assert (claim.outcome, claim.active, claim.dropped) == ("interrupt", first, [second])
    assert await client.lrange(keys.thread_pending(thread_id), 0, -1) == [third.encode()]


async def test_context_budget_drops_old_turns_and_says_so(client: Redis) -> None:
    """With a small budget the oldest turns are left out, and the generation's metadata counts them."""
    thread_id = await _thread(client, system="", budget=30)
    starts = Starts()
    gen_id = ""
    for i in range(4):
        gen_id, claim = await _post(client, thread_id, f"question {i}", "reject", budget=30)
        assert claim.outcome == "start"
        await store.start_turn(client, thread_id, gen_id, starts)
        if i < 3:
            await _finish(client, gen_id, f"answer {i}")
            await store.on_generation_end(client, gen_id, starts)
    sent = await _request(client, gen_id)
    # 10 + 18 characters fit in 30: question 3 and the turn before it; two turns dropped.
    assert sent["request"]["messages"] == [
        {"role": "user", "content": "question 2"},
        {"role": "assistant", "content": "answer 2"},
        {"role": "user", "content": "question 3"},
    ]
    assert sent["metadata"]["context_dropped_turns"] == "2"


async def test_delete_removes_every_key_and_names_what_to_cancel(client: Redis) -> None:
    """Delete leaves no key of the thread and returns the active then the waiting generations."""
    thread_id = await _thread(client)
    first, _ = await _post(client, thread_id, "one")
    second, _ = await _post(client, thread_id, "two", "enqueue")
    assert await store.delete(client, thread_id, "someone-else") is None
    assert await store.delete(client, thread_id, TENANT) == [first, second]
    assert [k async for k in client.scan_iter(match=f"tr:{{{thread_id}}}*")] == []
    assert await client.zscore(keys.tenant_threads(TENANT), thread_id) is None
    # The active generation ends after the delete: its hook finds no thread and writes nothing.
    await _finish(client, first, "late")
    await store.on_generation_end(client, first, Starts())
    assert [k async for k in client.scan_iter(match=f"tr:{{{thread_id}}}*")] == []


async def test_repair_hands_over_a_slot_whose_generation_ended_unrecorded(client: Redis) -> None:
    """A thread whose active generation ended without its hook is freed by repair."""
    thread_id = await _thread(client)
    first, _ = await _post(client, thread_id, "one")
    await _finish(client, first, "done")
    assert await store.repair(client, thread_id, first, Starts())
    _, claim = await _post(client, thread_id, "two")
    assert claim.outcome == "start"


async def test_listing_pages_by_activity_and_prunes_expired_threads(client: Redis) -> None:
    """Pages follow last activity (newest first) through ties, without repeats; expired entries go."""
    ids = [await _thread(client) for _ in range(7)]
    index = keys.tenant_threads(TENANT)
    await client.zadd(index, {thread_id: 100.0 for thread_id in ids[:4]})  # four-way tie
    await client.zadd(index, {ids[4]: 200.0, ids[5]: 50.0, ids[6]: 300.0})
    await client.delete(keys.thread_meta(ids[5]))  # expired
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await store.list_threads(client, TENANT, 2, cursor)
        seen += [t.id for t in page]
        if cursor is None:
            break
    tied = sorted(ids[:4], reverse=True)
    assert seen == [ids[6], ids[4], *tied]
    assert await client.zscore(index, ids[5]) is None
    with pytest.raises(ValueError):
        await store.list_threads(client, TENANT, 2, "not-a-cursor")
