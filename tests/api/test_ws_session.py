"""A /v1/ws socket (api.ws_session) in a real server, under uvicorn's own WebSocket protocol
and under ``tokenrelay api``'s (the socket taken over): pings, a stalled socket cut by the
send timeout, disconnects and draining that release everything."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.api.server import Api, append, create, serve, until
from tokenrelay.api.ws_transport import TakeoverProtocol
from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys


def url(api: Api) -> str:
    return api.url.replace("http://", "ws://") + "/v1/ws"


async def subscribe(ws: ClientConnection, gen_id: str) -> None:
    """Subscribe (events of earlier subscriptions that come meanwhile are skipped)."""
    await ws.send(json.dumps({"type": "subscribe", "generation_id": gen_id}))
    while (reply := json.loads(await ws.recv()))["type"] == "event":
        pass
    assert reply == {"type": "subscribed", "generation_id": gen_id}


async def events(ws: ClientConnection, until_type: str = ev.DONE) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while not out or out[-1]["event"] != until_type:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message["type"] == "event":
            out.append(message)
    return out


@pytest.fixture(params=["websocket.send", "frames"])
async def both(request: pytest.FixtureRequest, redis_server: RedisServer
               ) -> AsyncIterator[tuple[Api, bool]]:
    """The API under uvicorn's own websockets-sansio protocol (one websocket.send per
    message, compressed when the client asks), and under ``tokenrelay api``'s (pre-framed
    writes, no compression)."""
    ws = "websockets-sansio" if request.param == "websocket.send" else TakeoverProtocol
    async with serve(redis_server, ws=ws, heartbeat_s=0.2, send_timeout_s=0.5) as running:
        yield running, request.param == "frames"


async def test_idle_socket_gets_ping_messages(both: tuple[Api, bool]) -> None:
    """While nothing happens, a subscribed socket receives `ping` messages (heartbeat 0.2 s)."""
    api, _ = both
    gen_id = await create(api)
    async with connect(url(api)) as ws:
        await subscribe(ws, gen_id)
        assert json.loads(await ws.recv())["event"] == "status"
        for _ in range(3):
            assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "ping"}


async def test_stalled_socket_is_cut_and_the_others_get_everything(
    both: tuple[Api, bool],
) -> None:
    """A socket that stops reading is dropped after the send timeout; the other sockets on the
    same generation miss nothing, and every registration goes."""
    api, frames = both
    gen_id = await create(api)
    healthy = [await connect(url(api)) for _ in range(3)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", api.port))
    # It reads no more once one message is queued; uncompressed, so the bytes are what they seem.
    stalled = await connect(url(api), sock=sock, max_queue=1, compression=None)
    try:
        for ws in [*healthy, stalled]:
            await subscribe(ws, gen_id)
        await until(lambda: api.hub.viewer_count == 4, "four subscriptions")
        word = "x" * 8000
        for i in range(400):  # ~3 MB: far more than the stalled socket's buffers hold
            await append(api, gen_id, ev.DELTA, {"content": f"{i}{word}"})
        await append(api, gen_id, ev.DONE, {"finish_reason": "length"})
        expected = [eid.decode() for eid, _ in await api.redis.xrange(keys.events(gen_id))]
        for ws in healthy:
            assert [m["id"] for m in await events(ws)] == expected
        await until(lambda: api.hub.connections.stalled_total == 1, "the stalled socket cut")
        if frames:
            # tokenrelay api resets it: neither the process nor the kernel keeps its buffers
            # waiting for a peer that does not read (a plain close would wait forever).
            await until(lambda: sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        == errno.ECONNRESET, "the stalled socket to be reset")
        await until(lambda: api.hub.viewer_count == 0, "every subscription to go")
        await until(lambda: len(api.hub.connections) == 3, "the stalled socket's registration")
    finally:
        for ws in healthy:
            await ws.close()
        stalled.transport.abort()
    await until(lambda: len(api.hub.connections) == 0, "every socket to go")


async def test_disconnect_and_unsubscribe_release_the_hub(both: tuple[Api, bool]) -> None:
    """Subscriptions leave the hub on unsubscribe, at their terminal event, and when the
    socket goes; the socket leaves the ticker."""
    api, _ = both
    gen_ids = [await create(api) for _ in range(3)]
    ws = await connect(url(api))
    for gen_id in gen_ids:
        await subscribe(ws, gen_id)
    await until(lambda: api.hub.viewer_count == 3, "three subscriptions")
    await ws.send(json.dumps({"type": "unsubscribe", "generation_id": gen_ids[0]}))
    await until(lambda: api.hub.viewer_count == 2, "the unsubscribed one to leave")
    await append(api, gen_ids[1], ev.DONE, {"finish_reason": "stop"})
    await until(lambda: api.hub.viewer_count == 1, "the ended one to leave")
    await ws.close()
    await until(lambda: api.hub.viewer_count == 0 and len(api.hub.connections) == 0,
                "the socket's registrations to go")
    assert not api.hub.channels


async def test_draining_closes_sockets_with_1012(both: tuple[Api, bool]) -> None:
    """On SIGTERM (the hub drains) a socket is closed with 1012, so the client reconnects
    elsewhere and resumes with `after`; it leaves the hub."""
    api, _ = both
    gen_id = await create(api)
    async with connect(url(api)) as ws:
        await subscribe(ws, gen_id)
        api.hub.connections.drain()
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1012
    await until(lambda: api.hub.viewer_count == 0 and len(api.hub.connections) == 0,
                "the socket's registrations to go")
