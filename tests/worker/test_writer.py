"""The worker's batched writer against a real redis-server: order, fencing, exactly once,
coalescing, and a Redis restart in the middle of the batches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import streams
from tokenrelay.worker.lease import RedisClock
from tokenrelay.worker.writer import Fenced, Slot, Writer


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def _clock(client: Redis, ttl_s: int = 4, margin_s: float = 1.0) -> RedisClock:
    """A worker's clock, read from ``client``'s Redis as its lease renewal does."""
    clock = RedisClock()
    await clock.renew(client, "tr:test:alive", ttl_s, margin_s)
    return clock


async def _running(client: Redis, n: int, attempt: int = 1) -> list[Slot]:
    """``n`` generations started by ``attempt``, as the writer's slots."""
    slots = []
    for i in range(n):
        gen_id = f"gen_{i:032x}"
        await streams.create(client, streams.NewGeneration(gen_id, "t1", "fake:lorem", {}, 1.0))
        started, base = await streams.start(client, gen_id, attempt)
        assert started
        slots.append(Slot(gen_id, base))
    return slots


async def _deltas(client: Redis, gen_id: str) -> list[str]:
    entries = await streams.read_after(client, gen_id, None)
    return [e.data.get("content", "") for e in (ev.decode_entry(*x) for x in entries)
            if e.type == ev.DELTA]


async def test_many_generations_go_in_one_call_in_order(client: Redis) -> None:
    """Deltas of 50 generations queued together are written by one script call, each
    generation's in order, its content key equal to its events."""
    slots = await _running(client, 50)
    writer = Writer(client, await _clock(client))
    for word in ("a", "b", "c"):
        for slot in slots:
            writer.append(slot, {"content": word})
    await writer.flush()
    assert writer.calls == 1
    for slot in slots:
        await writer.drain(slot)
        assert await _deltas(client, slot.gen_id) == ["a", "b", "c"]
        assert (await streams.read_status(client, slot.gen_id))[1] == "abc"  # type: ignore[index]
        assert slot.content == "abc"


def _ms(time: tuple[int, int]) -> int:
    """Redis TIME (seconds, microseconds) in milliseconds."""
    return time[0] * 1000 + time[1] // 1000


async def test_delta_ids_carry_redis_time_and_stop_at_the_lease(client: Redis) -> None:
    """A delta's id is Redis's time when the writer took it (as the stream's other ids
    are), and never at or past the end of the worker's lease, whatever its clock says."""
    (slot,) = await _running(client, 1)
    writer = Writer(client, await _clock(client))
    before = await client.time()
    writer.append(slot, {"content": "a"})
    await writer.flush()
    after = await client.time()
    (delta,) = (await streams.read_after(client, slot.gen_id, None))[-1:]
    ms = ev.parse_id(delta[0].decode())[0]
    assert _ms(before) - 5 <= ms <= _ms(after)

    # A lease that ends now, in a later millisecond than "a" (in the same one, no id
    # above "a" could be below the limit; the writer then keeps to the key's 1 s margin).
    deadline = asyncio.get_running_loop().time() + 5
    while _ms(await client.time()) <= ms:
        assert asyncio.get_running_loop().time() < deadline, "Redis's clock stood still"
    ended = await _clock(client, ttl_s=1, margin_s=1.0)
    writer = Writer(client, ended)
    for word in ("b", "c"):
        writer.append(slot, {"content": word})
        await writer.flush()
    await writer.drain(slot)
    ids = [ev.parse_id(e[0].decode()) for e in await streams.read_after(client, slot.gen_id, None)]
    assert ids == sorted(ids) and all(i[0] < ended.limit_ms for i in ids[-2:])
    assert slot.content == "abc"


async def test_a_resent_batch_appends_nothing_twice(client: Redis) -> None:
    """A batch sent again (its reply was lost), alone or with later entries, is applied once."""
    (slot,) = await _running(client, 1)
    gen_id = slot.gen_id
    ms = slot.last_id[0] + 1
    a, b, c = ((f"{ms}-{n}", f'{{"content":"{w}"}}', w) for n, w in enumerate("abc"))
    first = streams.Appends(gen_id, 1, [a, b])
    assert await streams.append_batch(client, [first]) == [True]
    assert await streams.append_batch(client, [first]) == [True]
    more = streams.Appends(gen_id, 2, [b, c])
    assert await streams.append_batch(client, [more]) == [True]
    assert await _deltas(client, gen_id) == ["a", "b", "c"]
    assert (await streams.read_status(client, gen_id))[1] == "abc"  # type: ignore[index]


class ReplyDropper:
    """A TCP proxy to Redis that, when asked, closes the client's connection instead of
    passing on the next reply: the command ran, its caller never hears so and re-sends."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.drop = 0
        self.dropped = 0
        self.port = 0

    async def start(self) -> ReplyDropper:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
            up_writer.close()

        async def replies() -> None:
            while data := await up_reader.read(65536):
                if self.drop:
                    self.drop -= 1
                    self.dropped += 1
                    break
                writer.write(data)
            writer.close()
            up_writer.close()

        await asyncio.gather(requests(), replies(), return_exceptions=True)


async def test_a_batch_whose_reply_is_lost_is_applied_once(redis_server: RedisServer) -> None:
    """The connection drops after Redis ran a batch: the batch is sent again, and every
    generation still has each delta once."""
    proxy = await ReplyDropper(redis_server.port).start()
    client = Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0")
    try:
        slots = await _running(client, 5)
        writer = Writer(client, await _clock(client))
        for word in ("a", "b", "c"):
            for slot in slots:
                writer.append(slot, {"content": word})
            proxy.drop = 1
            await writer.flush()
        assert proxy.dropped == 3
        for slot in slots:
            await writer.drain(slot)
            assert await _deltas(client, slot.gen_id) == ["a", "b", "c"]
            assert (await streams.read_status(client, slot.gen_id))[1] == "abc"  # type: ignore[index]
    finally:
        await client.aclose()


async def test_a_fenced_generation_stops_and_its_neighbours_write(client: Redis) -> None:
    """In one batch, the generation a newer attempt took over writes nothing and its pump
    is told (Fenced); the other generations are written."""
    stale, fine = await _running(client, 2)
    old, other = stale.gen_id, fine.gen_id
    # This worker's lease ran out (its key expired, as a stalled or cut-off worker's
    # does), then attempt 2 took over elsewhere; its clock still runs.
    writer = Writer(client, await _clock(client, ttl_s=1, margin_s=1.0))
    assert (await streams.start(client, old, 2))[0]
    writer.append(stale, {"content": "stale"})
    writer.append(fine, {"content": "fine"})
    await writer.flush()
    with pytest.raises(Fenced):
        await writer.drain(stale)
    with pytest.raises(Fenced):
        writer.append(stale, {"content": "more"})
    await writer.drain(fine)
    assert await _deltas(client, old) == []
    assert await _deltas(client, other) == ["fine"]


async def test_coalescing_makes_one_entry_per_window_with_the_same_text(client: Redis) -> None:
    """With a window, consecutive text deltas become one entry per flush; reasoning and
    tool calls are not merged with text."""
    (slot,) = await _running(client, 1)
    gen_id = slot.gen_id
    writer = Writer(client, await _clock(client), coalesce_s=0.02)
    for word in ("a", " b", " c"):
        writer.append(slot, {"content": word})
    writer.append(slot, {"reasoning": "r"})
    writer.append(slot, {"content": " d"})
    await writer.flush()
    writer.append(slot, {"content": " e"})
    await writer.flush()
    entries = await streams.read_after(client, gen_id, None)
    data = [ev.decode_entry(*x).data for x in entries if ev.decode_entry(*x).type == ev.DELTA]
    assert data == [{"content": "a b c"}, {"reasoning": "r"}, {"content": " d"},
                    {"content": " e"}]
    assert (await streams.read_status(client, gen_id))[1] == "a b c d e"  # type: ignore[index]


async def test_a_redis_restart_mid_batches_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """Twenty generations stream through one writer while Redis restarts (AOF): each
    ends with every word once, in order, in its events and in its content."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    client = Redis.from_url(server.url)
    writer = Writer(client, await _clock(client))
    writer.start()
    try:
        slots = await _running(client, 20)
        words = [f" w{i}" for i in range(200)]
        halfway, restarted = asyncio.Event(), asyncio.Event()

        async def pump(slot: Slot) -> None:
            for i, word in enumerate(words):
                writer.append(slot, {"content": word})
                if i == 100:
                    halfway.set()
                    await restarted.wait()
                await asyncio.sleep(0.002)
            await writer.drain(slot)

        pumps = asyncio.gather(*(pump(slot) for slot in slots))
        await asyncio.wait_for(halfway.wait(), 30)  # batches are being written
        server.stop()  # a clean shutdown writes the AOF; replies in flight are lost
        server.start()
        restarted.set()
        await asyncio.wait_for(pumps, 60)
        for slot in slots:
            assert "".join(await _deltas(client, slot.gen_id)) == "".join(words)
            assert (await streams.read_status(client, slot.gen_id))[1] == "".join(words)  # type: ignore[index]
            assert slot.content == "".join(words)
    finally:
        await writer.stop()
        await client.aclose()
        server.stop()
