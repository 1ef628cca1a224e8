"""The hub's readers (api.readers) against a private redis-server: one XREAD for every
stream, one per slot on a Cluster, woken by new streams, resuming from cursors."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from tests.api.server import until
from tokenrelay.api.channel import Channel
from tokenrelay.api.readers import BLOCK_MS, ClusterReader, SingleReader, deliver
from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys

# Well under BLOCK_MS: a stream added during a blocking read is read before it times out.
PROMPT_S = BLOCK_MS / 1000 / 3


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def xadd(redis: Redis, gen_id: str, event_type: str = ev.DELTA, **data: Any) -> str:
    fields: dict[Any, Any] = ev.entry_fields(event_type, data or {"content": "x"})
    entry_id = await redis.xadd(keys.events(gen_id), fields)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def hub_clients(redis: Redis) -> list[dict[str, Any]]:
    """The hub's blocking connections, as Redis lists them."""
    return [c for c in await redis.client_list() if c.get("name") == "tokenrelay-hub"]


async def blocked_in_xread(redis: Redis) -> bool:
    return any(c.get("cmd") == "xread" for c in await hub_clients(redis))


def loaded(gen_id: str) -> Channel:
    """A channel as the hub hands it to its reader: loaded, empty, cursor at the start."""
    return Channel(gen_id, 1000)


async def test_deliver_appends_by_stream_and_reports_lag() -> None:
    """A batch goes to its streams' channels (not to closed or unknown ones), lag is reported."""
    open_, closed = loaded("a"), loaded("b")
    closed.closed = True
    lags: list[float] = []
    batch = [(keys.events("a").encode(), [(b"1-0", {b"t": b"delta", b"d": b'{"content":"x"}'})]),
             (keys.events("b").encode(), [(b"1-1", {b"t": b"delta", b"d": b"{}"})]),
             (b"tr:elsewhere", [(b"1-2", {b"t": b"delta", b"d": b"{}"})])]
    deliver(batch, {keys.events("a"): open_, keys.events("b"): closed}, lags.append)
    assert [e.id for e in open_.events] == ["1-0"] and open_.cursor == "1-0"
    assert closed.events == []
    assert len(lags) == 1 and lags[0] > 1e6  # appended in 1970, by its id


async def test_a_malformed_entry_fails_its_stream_only() -> None:
    """An entry that does not decode fails its own channel (viewers raise); others go on."""
    bad, good = loaded("bad"), loaded("good")
    batch = [(keys.events("bad"), [(b"1-0", {b"type": b"delta", b"data": b"{}"})]),
             (keys.events("good"), [(b"1-1", {b"t": b"delta", b"d": b"{}"})])]
    deliver(batch, {keys.events("bad"): bad, keys.events("good"): good}, None)
    assert isinstance(bad.failed, KeyError) and not bad.active
    assert [e.id for e in good.events] == ["1-1"] and good.active


async def test_single_reader_reads_every_stream_and_a_new_one_wakes_its_read(
    redis_server: RedisServer, redis: Redis,
) -> None:
    """One blocking XREAD serves every stream; a stream added mid-read is read promptly."""
    lags: list[float] = []
    reader = SingleReader(Redis.from_url(redis_server.url), redis_server.url, lags.append)
    reader.start()
    try:
        first, second = loaded("gen_first"), loaded("gen_second")
        await reader.add(first)
        await xadd(redis, "gen_first")
        await until(lambda: len(first.events) == 1, "the first stream's event")
        await until(lambda: blocked_in_xread(redis), "the reader to block again")

        await xadd(redis, "gen_second")  # written before the channel joins: read from 0-0
        await reader.add(second)
        await until(lambda: len(second.events) == 1, "the new stream's event", within=PROMPT_S)
        await xadd(redis, "gen_first", ev.DONE)
        await until(lambda: first.done, "the first stream's end")
        assert len(await hub_clients(redis)) == 1  # one connection reads both
        assert lags and all(lag >= 0 for lag in lags)
    finally:
        await reader.stop()
    assert await hub_clients(redis) == []
    assert await redis.keys("tr:hub:*") == []  # its wake stream is removed


async def test_reader_resumes_from_its_cursors_after_losing_its_connection(
    redis_server: RedisServer, redis: Redis,
) -> None:
    """A killed reader connection is replaced, and the read goes on with no gap or duplicate."""
    reader = SingleReader(Redis.from_url(redis_server.url), redis_server.url)
    reader.start()
    try:
        channel = loaded("gen_kill")
        await reader.add(channel)
        written = [await xadd(redis, "gen_kill") for _ in range(3)]
        await until(lambda: len(channel.events) == 3, "the first events")
        await until(lambda: blocked_in_xread(redis), "the reader to block")
        for client in await hub_clients(redis):
            await redis.client_kill_filter(_id=client["id"])
        written += [await xadd(redis, "gen_kill") for _ in range(3)]
        written.append(await xadd(redis, "gen_kill", ev.DONE))
        await until(lambda: channel.done, "the stream's end after the reconnect")
        assert [e.id for e in channel.events] == written
    finally:
        await reader.stop()


def _ids_in_slots(count: int) -> tuple[list[str], str]:
    """``count`` generation ids in distinct slots, and one more sharing the first one's slot."""
    slot_of = {}
    for n in itertools.count():
        gen_id = f"gen_{n}"
        slot = key_slot(keys.events(gen_id).encode())
        if slot_of and slot == next(iter(slot_of.values())) and len(slot_of) >= count:
            return list(slot_of)[:count], gen_id
        if slot not in slot_of.values() and len(slot_of) < count:
            slot_of[gen_id] = slot
    raise AssertionError("unreachable")


class OneNodeCluster(Redis):
    """A plain Redis standing in for a Cluster whose one node serves every slot."""

    def get_node_from_key(self, key: str) -> SimpleNamespace:
        kwargs = self.connection_pool.connection_kwargs
        return SimpleNamespace(host=kwargs["host"], port=kwargs["port"])


async def test_cluster_reader_reads_per_slot_and_ends_a_slot_with_its_streams(
    redis_server: RedisServer, redis: Redis,
) -> None:
    """One blocking connection per slot with active streams; none once their streams end."""
    (a, b), same_slot_as_a = _ids_in_slots(2)
    reader = ClusterReader(OneNodeCluster.from_url(redis_server.url))
    reader.start()
    try:
        channels = {gen_id: loaded(gen_id) for gen_id in (a, b, same_slot_as_a)}
        for channel in channels.values():
            await reader.add(channel)
        for gen_id in channels:
            await xadd(redis, gen_id)
        await until(lambda: all(len(ch.events) == 1 for ch in channels.values()),
                    "an event on every stream", within=PROMPT_S)
        assert len(await hub_clients(redis)) == 2  # two slots, two reads
        for gen_id in channels:
            await xadd(redis, gen_id, ev.DONE)
        await until(lambda: all(ch.done for ch in channels.values()), "every stream's end")
        await until(lambda: _none(hub_clients(redis)), "the slot reads to end")
        await until(lambda: _none(redis.keys("tr:hub:*")), "the wake streams to go")

        later = loaded(b)  # a slot read starts again for a stream that comes later
        await reader.add(later)
        await xadd(redis, b, ev.DONE)
        await until(lambda: later.done, "the later stream's events")
    finally:
        await reader.stop()
    assert await hub_clients(redis) == []


async def _none(items: Any) -> bool:
    return not await items
