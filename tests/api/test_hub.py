"""The hub (api.hub): one channel per stream for every protocol, catch-up from Redis,
authorisation from memory, a clean stop."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from redis.asyncio import Redis

from tests.api.server import HTTP_PROTOCOLS, Api, RawViewer, append, create, serve, until
from tokenrelay.api.channel import Channel, events_after
from tokenrelay.api.hub import Hub
from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys


async def test_sse_and_typed_viewers_share_one_channel_and_see_the_same_events(
    api: Api,
) -> None:
    """An SSE viewer and an in-process typed consumer of one stream: one channel, same events."""
    gen_id = await create(api)
    sse = await RawViewer.open(api, gen_id)
    await sse.read_until(b'"queued"')
    typed: list[ev.Event] = []

    async def consume() -> None:
        async with contextlib.aclosing(events_after(api.hub, gen_id, None)) as events:
            async for event in events:
                typed.append(event)

    consumer = asyncio.create_task(consume())
    await until(lambda: api.hub.viewer_count == 2, "both registrations")
    assert list(api.hub.channels) == [gen_id]
    await append(api, gen_id, ev.STATUS, {"status": "running"})
    for word in ("one", "two"):
        await append(api, gen_id, ev.DELTA, {"content": f" {word}"})
    await append(api, gen_id, ev.DONE, {"finish_reason": "stop"})
    await asyncio.wait_for(consumer, 10)
    await sse.read_to_end()
    sse.close()
    assert typed == sse.events() and [e.type for e in typed][-1] == "done"
    await until(lambda: api.hub.viewer_count == 0 and not api.hub.channels, "the channel to go")


class IdleReader:
    """A reader that reads nothing, and says whether it was stopped."""

    stopped = False

    def start(self) -> None:
        pass

    async def add(self, channel: Channel) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True


async def test_stop_cancels_a_pending_load_and_stops_the_reader(
    redis_server: RedisServer,
) -> None:
    """A tail still loading when the hub stops is cancelled, its joiner released, its reader
    stopped: nothing is left running."""
    redis = Redis.from_url(redis_server.url)
    admin = Redis.from_url(redis_server.url)
    reader = IdleReader()
    hub = Hub(redis, reader, 100)
    hub.start()
    try:
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # the load waits
        joiner = asyncio.create_task(hub.join("gen_paused"))
        await until(lambda: "gen_paused" in hub.channels, "the load to start")
        async with asyncio.timeout(0.75):  # well before the pause ends
            await hub.stop()
            with pytest.raises(asyncio.CancelledError):
                await joiner
        assert reader.stopped and hub.viewer_count == 0
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("tr-hub-load")]
    finally:
        await admin.aclose()
        await redis.aclose()


@pytest.mark.parametrize("server", list(HTTP_PROTOCOLS))
async def test_viewer_behind_the_channel_memory_catches_up_from_redis(
    redis_server: RedisServer, server: str,
) -> None:
    """With a tiny channel cap, a viewer far behind reads Redis, then memory: no gap, no dup."""
    async with serve(redis_server, http=HTTP_PROTOCOLS[server], hub_history_frames=8,
                     send_timeout_s=30) as api:
        gen_id = await create(api)
        viewer = await RawViewer.open(api, gen_id, rcvbuf=4096)  # reads nothing for now
        await until(lambda: api.hub.viewer_count == 1, "the registration")
        await append(api, gen_id, ev.STATUS, {"status": "running"})
        async with api.redis.pipeline(transaction=False) as pipe:
            for i in range(2000):  # ~2 MB: more than the socket buffers hold
                fields = ev.entry_fields(ev.DELTA, {"content": f" {i}" + "y" * 1000})
                pipe.xadd(keys.events(gen_id), fields)  # type: ignore[arg-type]
            await pipe.execute()
        channel = api.hub.channels[gen_id]
        await until(lambda: channel.end >= 2002, "the hub to read every entry")
        assert channel.base > 0  # the viewer's part left memory
        viewer.writer.transport.resume_reading()  # type: ignore[attr-defined]
        await append(api, gen_id, ev.DONE, {"finish_reason": "length"})
        await viewer.read_to_end(within=20)
        expected = [eid.decode() for eid, _ in await api.redis.xrange(keys.events(gen_id))]
        assert [e.id for e in viewer.events()] == expected
        assert api.hub.catchup_reads > 0  # it did go to Redis for the part memory had dropped
        viewer.close()


async def test_viewers_of_a_served_stream_are_authorised_from_memory(
    redis_server: RedisServer,
) -> None:
    """Once a stream is served here, more viewers cost no Redis reads; other tenants get 404."""
    async with serve(redis_server, api_keys="t1:k1,t2:k2") as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            created = await client.post("/v1/generations", headers={"Authorization": "Bearer k1"},
                                        json={"model": "fake:lorem", "prompt": "hub"})
            gen_id = created.json()["id"]
            path = f"/v1/generations/{gen_id}/events"
            async with client.stream("GET", path, headers={"Authorization": "Bearer k1"}) as one:
                assert one.status_code == 200
                await until(lambda: api.hub.viewer_count == 1, "the registration")
                await api.redis.config_resetstat()
                for _ in range(5):
                    async with client.stream("GET", path,
                                             headers={"Authorization": "Bearer k1"}) as more:
                        assert more.status_code == 200
                stats = await api.redis.info("commandstats")
                assert "cmdstat_hgetall" not in stats and "cmdstat_hget" not in stats
                other = await client.get(path, headers={"Authorization": "Bearer k2"})
                assert other.status_code == 404
                unknown = await client.get(f"/v1/generations/gen_{'0' * 32}/events",
                                           headers={"Authorization": "Bearer k1"})
                assert unknown.status_code == 404
                assert list(api.hub.channels) == [gen_id]  # nothing left behind by the 404s
                token = created.json()["stream_token"]
                async with client.stream("GET", f"{path}?token={token}") as shared:
                    assert shared.status_code == 200  # the share link still works
