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
from tokenrelay.worker.writer import Fenced, Slot, Writer


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    r = Redis.from_url(redis_server.url)
    yield r
    await r.aclose()


async def _running(client: Redis, n: int, attempt: int = 1) -> list[str]:
    ids = [f"gen_{i:032x}" for i in range(n)]
    for gen_id in ids:
        await streams.create(client, streams.NewGeneration(gen_id, "t1", "fake:lorem", {}, 1.0))
        assert (await streams.start(client, gen_id, attempt))[0]
    return ids


async def _deltas(client: Redis, gen_id: str) -> list[str]:
    entries = await streams.read_after(client, gen_id, None)
    return [e.data.get("content", "") for e in (ev.decode_entry(*x) for x in entries)
            if e.type == ev.DELTA]


async def test_many_generations_go_in_one_call_in_order(client: Redis) -> None:
    """Deltas of 50 generations queued together are written by one script call, each
    generation's in order, its content key equal to its events."""
    ids = await _running(client, 50)
    writer = Writer(client)
    slots = [Slot(gen_id, 1) for gen_id in ids]
    for word in ("a", "b", "c"):
        for slot in slots:
            writer.append(slot, {"content": word})
    await writer.flush()
    assert writer.calls == 1
    for slot in slots:
        await writer.drain(slot)
        assert await _deltas(client, slot.gen_id) == ["a", "b", "c"]
        assert (await streams.read_status(client, slot.gen_id))[1] == "abc"  # type: ignore[index]


async def test_a_resent_batch_appends_nothing_twice(client: Redis) -> None:
    """A batch sent again (its reply was lost), alone or with later entries, is applied once."""
    (gen_id,) = await _running(client, 1)
    first = streams.Appends(gen_id, 1, 1, [('{"content":"a"}', "a"), ('{"content":"b"}', "b")])
    assert await streams.append_batch(client, [first]) == [True]
    assert await streams.append_batch(client, [first]) == [True]
    more = streams.Appends(gen_id, 1, 2, [('{"content":"b"}', "b"), ('{"content":"c"}', "c")])
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
        ids = await _running(client, 5)
        writer = Writer(client)
        slots = [Slot(gen_id, 1) for gen_id in ids]
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
    old, other = await _running(client, 2)
    writer = Writer(client)
    stale, fine = Slot(old, 1), Slot(other, 1)
    assert (await streams.start(client, old, 2))[0]  # attempt 2 took over elsewhere
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
    (gen_id,) = await _running(client, 1)
    writer = Writer(client, coalesce_s=0.02)
    slot = Slot(gen_id, 1)
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
    writer = Writer(client)
    writer.start()
    try:
        ids = await _running(client, 20)
        words = [f" w{i}" for i in range(200)]
        halfway, restarted = asyncio.Event(), asyncio.Event()

        async def pump(gen_id: str) -> None:
            slot = Slot(gen_id, 1)
            for i, word in enumerate(words):
                writer.append(slot, {"content": word})
                if i == 100:
                    halfway.set()
                    await restarted.wait()
                await asyncio.sleep(0.002)
            await writer.drain(slot)

        pumps = asyncio.gather(*(pump(g) for g in ids))
        await asyncio.wait_for(halfway.wait(), 30)  # batches are being written
        server.stop()  # a clean shutdown writes the AOF; replies in flight are lost
        server.start()
        restarted.set()
        await asyncio.wait_for(pumps, 60)
        for gen_id in ids:
            assert "".join(await _deltas(client, gen_id)) == "".join(words)
            assert (await streams.read_status(client, gen_id))[1] == "".join(words)  # type: ignore[index]
    finally:
        await writer.stop()
        await client.aclose()
        server.stop()
