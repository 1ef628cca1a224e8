"""The hub's readers (api.readers) against a private redis-server: one XREAD for every
stream, one per slot on a Cluster, woken by new streams, resuming from cursors."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from tests.api.server import until
from tokenrelay.api.channel import Channel
from tokenrelay.api.readers import BLOCK_MS, READ_COUNT, ClusterReader, Roster, SingleReader
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


def roster_of(*channels: Channel) -> Roster:
    roster = Roster("tr:hub:test")
    for channel in channels:
        roster.put(keys.events(channel.gen_id), channel)
    return roster


def entry(entry_id: bytes, event_type: bytes = b"delta", data: bytes = b"{}") -> list[Any]:
    """An entry as a raw XREAD reply holds it: its id, then its fields as a flat list."""
    return [entry_id, [b"t", event_type, b"d", data]]


async def test_deliver_appends_by_stream_advances_cursors_and_reports_lag() -> None:
    """A reply goes to its streams' channels (not to closed or unknown ones), their cursors
    in the next command advance, and one lag is reported per read."""
    open_, closed = loaded("a"), loaded("b")
    roster = roster_of(open_, closed)
    closed.closed = True
    lags: list[float] = []
    reply = [[keys.events("a").encode(), [entry(b"1-0", data=b'{"content":"x"}'),
                                          entry(b"1-1")]],
             [keys.events("b").encode(), [entry(b"1-2")]],
             [b"tr:elsewhere", [entry(b"1-3")]]]
    roster.deliver(reply, lags.append)
    assert [e.id for e in open_.events] == ["1-0", "1-1"] and open_.cursor == "1-1"
    assert open_.events[0].data == {"content": "x"}
    assert closed.events == []
    assert len(lags) == 1 and lags[0] > 1e6  # appended in 1970, by its id
    command = roster.command()
    assert b"\r\n$3\r\n1-1\r\n" in command and b"1-0" not in command
    roster.sweep()
    assert roster.channels == [open_]
    assert roster.command().startswith(b"*10\r\n$5\r\nXREAD\r\n")  # one stream + the wake


async def test_the_command_is_the_one_redis_py_would_pack() -> None:
    """The packed command equals redis-py's packing of the same XREAD, after streams
    come and go (a removed stream's place taken by the last)."""
    channels = [loaded(f"g{n}") for n in range(4)]
    roster = roster_of(*channels)
    channels[1].closed = True
    roster.sweep()
    roster.deliver([[keys.events("g3").encode(), [entry(b"7-1")]]], None)
    roster.put(keys.events("g9"), loaded("g9"))
    named = {keys.events(ch.gen_id): ch.cursor for ch in roster.channels}
    assert named == {keys.events("g0"): "0-0", keys.events("g2"): "0-0",
                     keys.events("g3"): "7-1", keys.events("g9"): "0-0"}
    streams = {**named, "tr:hub:test": "0-0"}
    expected = Connection().pack_command(
        "XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS", *streams, *streams.values())
    assert roster.command() == b"".join(expected)


async def test_a_malformed_entry_fails_its_stream_only() -> None:
    """An entry that does not decode fails its own channel (viewers raise), which is no
    longer read; the others go on."""
    bad, good = loaded("bad"), loaded("good")
    roster = roster_of(bad, good)
    reply = [[keys.events("bad").encode(), [[b"1-0", [b"type", b"delta", b"data", b"{}"]]]],
             [keys.events("good").encode(), [entry(b"1-1")]]]
    roster.deliver(reply, None)
    assert isinstance(bad.failed, KeyError) and not bad.active
    assert [e.id for e in good.events] == ["1-1"] and good.active
    assert roster.channels == [good]


async def test_an_ended_stream_is_no_longer_read() -> None:
    """A stream whose terminal event is delivered leaves the roster at once."""
    ending, going_on = loaded("ending"), loaded("going_on")
    roster = roster_of(ending, going_on)
    roster.deliver([[keys.events("ending").encode(), [entry(b"1-0"), entry(b"1-1", b"done")]],
                    [keys.events("going_on").encode(), [entry(b"1-2")]]], None)
    assert ending.done and roster.channels == [going_on]
    assert keys.events("ending").encode() not in roster.command()


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


async def test_a_stream_rejoined_while_read_goes_to_its_new_channel_only(
    redis_server: RedisServer, redis: Redis,
) -> None:
    """A channel closed during a read and a new one for the same stream (its tail loaded):
    what comes next goes to the new channel, from its cursor, once; none to the old one."""
    reader = SingleReader(Redis.from_url(redis_server.url), redis_server.url)
    reader.start()
    try:
        old = loaded("gen_again")
        await reader.add(old)
        first = await xadd(redis, "gen_again")
        await until(lambda: len(old.events) == 1, "the first event")
        await until(lambda: blocked_in_xread(redis), "the reader to block")
        old.closed = True  # its last viewer left; a new one joins and loads the tail
        new = loaded("gen_again")
        new.append(await redis.xrange(keys.events("gen_again")))
        await reader.add(new)
        written = [await xadd(redis, "gen_again"), await xadd(redis, "gen_again", ev.DONE)]
        await until(lambda: new.done, "the new channel's end")
        assert [e.id for e in new.events] == [first, *written]
        assert [e.id for e in old.events] == [first]
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
