"""SSE streams that take their connection over under ``tokenrelay api``'s protocol (api.sse's
DirectStream, api.protocol's TAKE_OVER): no task per viewer, and the connection's life —
disconnects, heartbeats, the end and keep-alive, pipelining, drain — as through ASGI."""

from __future__ import annotations

import asyncio

from tests.api.server import (
    HTTP_PROTOCOLS,
    Api,
    RawViewer,
    append,
    create,
    hang_up,
    serve,
    until,
)
from tokenrelay.api.sse import DRAIN, DirectStream
from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _direct(api: Api) -> int:
    return sum(isinstance(conn, DirectStream) for conn in api.hub.connections.open)


async def test_taken_over_viewers_hold_no_task_and_leave_on_disconnect(
    direct_api: Api,
) -> None:
    """Twenty viewers hold no task once their head is out; idle or mid-stream, a viewer that
    hangs up leaves its connection and its hub registration."""
    api = direct_api
    gen_id = await create(api)
    baseline_tasks = len(asyncio.all_tasks())
    viewers = [await RawViewer.open(api, gen_id) for _ in range(20)]
    for viewer in viewers:
        await viewer.read_until(b'"queued"')
    assert api.hub.viewer_count == 20
    await until(lambda: _direct(api) == 20, "every stream to be taken over")
    assert api.hub.channels[gen_id].parked == 20
    # The ASGI calls have returned: what is left of twenty viewers is no task at all.
    await until(lambda: len(asyncio.all_tasks()) <= baseline_tasks, "the ASGI tasks to end")

    await hang_up(api, gen_id, viewers)
    await until(lambda: len(asyncio.all_tasks()) <= baseline_tasks, "no task left behind")


async def test_the_end_returns_the_connection_to_keep_alive(direct_api: Api) -> None:
    """After the terminal event and the terminating chunk, the connection serves its next
    request; one pipelined while the stream ran is answered after the stream's end."""
    api = direct_api
    gen_id = await create(api)
    viewer = await RawViewer.open(api, gen_id)
    await viewer.read_until(b'"queued"')
    await until(lambda: _direct(api) == 1, "the stream to be taken over")
    await viewer.request(HEALTH)  # pipelined behind the running stream
    await append(api, gen_id, ev.STATUS, {"status": "running"})
    await append(api, gen_id, ev.DELTA, {"content": " one"})
    await append(api, gen_id, ev.DONE, {"finish_reason": "stop"})
    await viewer.read_until(b'"status":"ok"')
    stream, _, after = viewer.data.partition(b"\r\n0\r\n\r\n")  # the stream ended first
    assert after.startswith(b"HTTP/1.1 200 OK") and b'"status":"ok"' not in stream
    assert [e.type for e in viewer.events()] == ["status", "status", "delta", "done"]

    viewer.data = b""
    await viewer.request(HEALTH)  # and the connection is still kept alive after that
    await viewer.read_until(b'"status":"ok"')
    assert viewer.data.startswith(b"HTTP/1.1 200 OK")
    await until(lambda: api.hub.viewer_count == 0 and len(api.hub.connections) == 0,
                "the viewer to leave")
    viewer.close()


async def test_a_request_pipelined_with_the_stream_is_served_after_it(direct_api: Api) -> None:
    """Sent in the same write as the stream's request, the next request waits for the stream
    (which then stays on the ASGI path: the connection has a request queued behind it)."""
    api = direct_api
    gen_id = await create(api)
    viewer = await RawViewer.open(api, gen_id)
    await viewer.request(HEALTH)
    await viewer.read_until(b'"queued"')
    await append(api, gen_id, ev.DONE, {"finish_reason": "stop"})
    await viewer.read_until(b'"status":"ok"')
    stream, _, after = viewer.data.partition(b"\r\n0\r\n\r\n")
    assert after.startswith(b"HTTP/1.1 200 OK") and b'"status":"ok"' not in stream
    viewer.close()


async def test_a_taken_over_idle_stream_gets_heartbeats(direct_api: Api) -> None:
    """While nothing happens, a viewer receives `: ping` comments and nothing else."""
    api = direct_api
    gen_id = await create(api)
    viewer = await RawViewer.open(api, gen_id)
    await viewer.read_until(b'"queued"')
    await until(lambda: _direct(api) == 1, "the stream to be taken over")
    start = len(viewer.data)
    while viewer.data[start:].count(b": ping\n") < 3:
        chunk = await asyncio.wait_for(viewer.reader.read(4096), 10)
        assert chunk, "the server closed an idle stream"
        viewer.data += chunk
    assert [e.type for e in viewer.events()] == ["status"]
    viewer.close()


async def test_drain_ends_taken_over_streams_with_the_hint(direct_api: Api) -> None:
    """``Connections.drain`` (SIGTERM) ends an idle and a busy stream with the reconnect hint
    and the terminating chunk; both leave the hub."""
    api = direct_api
    gen_id = await create(api)
    idle, busy = [await RawViewer.open(api, gen_id) for _ in range(2)]
    for viewer in (idle, busy):
        await viewer.read_until(b'"queued"')
    await until(lambda: _direct(api) == 2, "the streams to be taken over")
    await append(api, gen_id, ev.STATUS, {"status": "running"})
    await busy.read_until(b'"running"')
    api.hub.connections.drain()
    for viewer in (idle, busy):
        body = await viewer.read_to_end()
        assert body.endswith(DRAIN + b"\r\n0\r\n\r\n")
        viewer.close()
    await until(lambda: api.hub.viewer_count == 0 and len(api.hub.connections) == 0,
                "the drained viewers to leave")


async def test_a_stream_still_open_when_the_server_stops_is_closed(
    redis_server: RedisServer,
) -> None:
    """Past uvicorn's graceful timeout (no drain: not a signal), a taken-over stream has no
    task for uvicorn to cancel; the hub's stop closes its connection instead."""
    async with serve(redis_server, http=HTTP_PROTOCOLS["tokenrelay api"]) as api:
        gen_id = await create(api)
        viewer = await RawViewer.open(api, gen_id)
        await viewer.read_until(b'"queued"')
        await until(lambda: _direct(api) == 1, "the stream to be taken over")
    rest = await asyncio.wait_for(viewer.reader.read(), 10)  # EOF once closed
    assert b"0\r\n\r\n" not in rest  # cut, not ended as if complete
    assert api.hub.viewer_count == 0
    viewer.close()
