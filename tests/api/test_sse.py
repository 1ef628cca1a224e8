"""The SSE response and its connections (api.sse) in a real server: disconnects, stalled
viewers, heartbeats."""

from __future__ import annotations

import asyncio
import errno
import socket

from tests.api.server import Api, RawViewer, append, create, hang_up, until
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys


async def test_disconnect_frees_tasks_connections_and_hub_registration(api: Api) -> None:
    """Viewers that hang up, idle or mid-stream, leave no task, connection or registration."""
    gen_id = await create(api)
    baseline_tasks = len(asyncio.all_tasks())
    viewers = [await RawViewer.open(api, gen_id) for _ in range(20)]
    for viewer in viewers:
        await viewer.read_until(b'"queued"')
    assert api.hub.viewer_count == 20
    assert len(api.hub.connections) == 20
    assert api.hub.channels[gen_id].parked == 20
    assert len(asyncio.all_tasks()) >= baseline_tasks + 20  # each one holds at least a task

    await hang_up(api, gen_id, viewers)
    await until(lambda: len(asyncio.all_tasks()) <= baseline_tasks, "every viewer task to end")


async def test_stalled_viewer_is_cut_and_the_others_get_everything(
    either_api: tuple[Api, str],
) -> None:
    """A viewer that stops reading is closed after the send timeout; the others miss nothing.
    Under ``tokenrelay api``'s protocol the cut is a reset: neither the process nor the kernel
    keeps the megabytes queued for a peer that does not read (a close would wait for it)."""
    api, server = either_api
    gen_id = await create(api)
    healthy = [await RawViewer.open(api, gen_id) for _ in range(3)]
    stalled = await RawViewer.open(api, gen_id, rcvbuf=4096)
    for viewer in healthy:
        await viewer.read_until(b'"queued"')
    await until(lambda: api.hub.viewer_count == 4, "four registrations")

    await append(api, gen_id, ev.STATUS, {"status": "running"})
    word = "x" * 8000
    for i in range(400):  # ~3 MB: far more than the stalled socket's buffers hold
        await append(api, gen_id, ev.DELTA, {"content": f"{i}{word}"})
        if i % 50 == 0:
            for viewer in healthy:
                await viewer.read_until(f'"content":"{i}x'.encode())
    await append(api, gen_id, ev.DONE, {"finish_reason": "length"})

    await until(lambda: api.hub.connections.stalled_total == 1, "the stalled viewer to be cut")
    if server == "tokenrelay api":
        sock = stalled.writer.get_extra_info("socket")
        await until(lambda: sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    == errno.ECONNRESET, "the stalled connection to be reset")
    expected = [eid.decode() for eid, _ in await api.redis.xrange(keys.events(gen_id))]
    for viewer in healthy:
        await viewer.read_to_end()
        assert viewer.data.partition(b"\r\n\r\n")[2].startswith(b"c\r\nretry: 1000\n")
        assert viewer.data.endswith(b"0\r\n\r\n")  # the response ends after the terminal event
        assert [e.id for e in viewer.events()] == expected
    await until(lambda: api.hub.viewer_count == 0 and len(api.hub.connections) == 0,
                "every registration to go")
    stalled.close()


async def test_idle_viewer_gets_heartbeat_comments(api: Api) -> None:
    """While nothing happens, a viewer receives `: ping` comments and nothing else."""
    gen_id = await create(api)
    viewer = await RawViewer.open(api, gen_id)
    await viewer.read_until(b'"queued"')
    start = len(viewer.data)
    while viewer.data[start:].count(b": ping\n") < 3:  # a comment line, blank line or not
        chunk = await asyncio.wait_for(viewer.reader.read(4096), 10)
        assert chunk, "the server closed an idle stream"
        viewer.data += chunk
    assert [e.type for e in viewer.events()] == ["status"]
    viewer.close()
