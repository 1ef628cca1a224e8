"""``/v1/ws`` end to end: two API processes, two workers, a private Redis, the Python
``websockets`` client. The WebSocket's events are compared with the SSE endpoint's."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests import client
from tests.client import collect, stored_generations, text_of
from tests.stack import Stack, wait_for
from tokenrelay.shared.events import Event

pytestmark = pytest.mark.slow  # starts real processes

ACME = {"Authorization": "Bearer k-acme"}
GLOBEX = {"Authorization": "Bearer k-globex"}
MAX_SUBS = 4
TIMEOUT = 30.0
GRACE_S = 1.0  # on_disconnect cancel: how long a generation may have no viewer
WORDS = " ".join(f"w{i}" for i in range(40))  # fake:echo at 30 words/s: over a second


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack(apis=2, workers=2, env={
        "TOKENRELAY_API_KEYS": "acme:k-acme,globex:k-globex",
        "TOKENRELAY_WS_MAX_SUBSCRIPTIONS": str(MAX_SUBS),
        "TOKENRELAY_WS_ALLOWED_ORIGINS": "https://app.example.com",
        "TOKENRELAY_MAX_BODY_BYTES": "20000",
        "TOKENRELAY_HEARTBEAT_S": "0.5",
        # The HTTP clocks of `tokenrelay api` (api/protocol.py) must not reach an upgraded
        # connection: a socket outlives them in the first test.
        "TOKENRELAY_REQUEST_HEAD_TIMEOUT_S": "1",
        "TOKENRELAY_REQUEST_BODY_TIMEOUT_S": "1",
        "TOKENRELAY_ABANDON_GRACE_S": str(GRACE_S),
    })
    yield s
    s.stop()


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/v1/ws" + query


def create(base: str, **body: Any) -> str:
    gen_id: str = client.create(base, ACME, **body)["id"]
    return gen_id


def cancel(base: str, gen_id: str) -> None:
    httpx.post(f"{base}/v1/generations/{gen_id}/cancel", headers=ACME, timeout=10)


def new_thread(base: str) -> dict[str, Any]:
    response = httpx.post(f"{base}/v1/threads", json={"model": "fake:echo"}, headers=ACME,
                          timeout=10)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def send(ws: ClientConnection, **message: Any) -> None:
    await ws.send(json.dumps(message))


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next message other than a ping."""
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if message["type"] != "ping":
            return message


async def reply(ws: ClientConnection, **message: Any) -> dict[str, Any]:
    """Send a message and return the server's direct reply (events are not expected)."""
    await send(ws, **message)
    answer = await receive(ws)
    assert answer["type"] != "event", answer
    return answer


async def events_until_end(ws: ClientConnection, gen_ids: set[str],
                           others: list[dict[str, Any]] | None = None) -> dict[str, list[Event]]:
    """Event messages by generation until each of ``gen_ids`` has sent its terminal event;
    any other message goes to ``others`` (none may come without it)."""
    got: dict[str, list[Event]] = {gen_id: [] for gen_id in gen_ids}
    open_ids = set(gen_ids)
    while open_ids:
        message = await receive(ws)
        if message["type"] != "event":
            assert others is not None, message
            others.append(message)
            continue
        assert message["generation_id"] in gen_ids, message
        event = Event(message["id"], message["event"], message["data"])
        got[message["generation_id"]].append(event)
        if event.terminal:
            open_ids.discard(message["generation_id"])
    return got


async def test_one_socket_three_generations_each_exactly_the_sse_events(stack: Stack) -> None:
    """One socket subscribed to three generations receives, for each, the SSE stream's event list: same ids, types and data, in order, each once."""
    gen_ids = [create(stack.urls[i % 2], model="fake:lorem", prompt="x", max_tokens=12 + i)
               for i in range(3)]
    async with connect(ws_url(stack.urls[0]), additional_headers=ACME) as ws:
        for gen_id in gen_ids:
            await send(ws, type="subscribe", generation_id=gen_id, ref=gen_id)
        replies: list[dict[str, Any]] = []
        got = await events_until_end(ws, set(gen_ids), replies)
        assert replies == [{"type": "subscribed", "generation_id": gen_id, "ref": gen_id}
                           for gen_id in gen_ids]
        for _ in range(3):  # idle: a ping every HEARTBEAT_S, past the HTTP clocks (1 s)
            assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)) == {"type": "ping"}
        assert (await reply(ws, type="ping", ref=7)) == {"type": "pong", "ref": 7}
    for i, gen_id in enumerate(gen_ids):
        sse = collect(stack.urls[1], gen_id, headers=ACME)
        assert got[gen_id] == sse
        assert [e.type for e in sse].count("delta") == 12 + i
        assert sse[-1].type == "done"


async def test_resubscribe_with_after_on_the_other_process_resumes_exactly(stack: Stack) -> None:
    """A generation created over the socket, read for k events, then the socket dropped: a new socket on the other API process subscribing with `after` gets exactly the rest."""
    for k in (1, 2, 7):
        async with connect(ws_url(stack.urls[0]), additional_headers=ACME) as ws:
            created = await reply(ws, type="create", ref="c",
                                  request={"model": "fake:lorem", "prompt": "x",
                                           "max_tokens": 20})
            assert created["type"] == "created" and created["ref"] == "c", created
            gen_id = created["generation_id"]
            assert (await receive(ws))["type"] == "subscribed"
            first = [await receive(ws) for _ in range(k)]
        assert all(m["type"] == "event" for m in first)
        async with connect(ws_url(stack.urls[1]), additional_headers=ACME) as ws:
            answer = await reply(ws, type="subscribe", generation_id=gen_id, after=first[-1]["id"])
            assert answer["type"] == "subscribed"
            rest = (await events_until_end(ws, {gen_id}))[gen_id]
        head = [Event(m["id"], m["event"], m["data"]) for m in first]
        sse = collect(stack.urls[0], gen_id, headers=ACME)
        assert head + rest == sse, f"k={k}"
        assert text_of(head + rest) == text_of(sse) != ""


async def test_cancel_over_the_socket_ends_the_generation_cancelled(stack: Stack) -> None:
    """`cancel` over the socket ends a running generation with a `cancelled` event; the latency from the message to that event is measured over 20 runs."""
    latencies = []
    async with connect(ws_url(stack.urls[0]), additional_headers=ACME) as ws:
        for _ in range(20):
            created = await reply(ws, type="create",
                                  request={"model": "fake:lorem", "prompt": "x",
                                           "max_tokens": 2000})
            gen_id = created["generation_id"]
            assert (await receive(ws))["type"] == "subscribed"
            while (await receive(ws)).get("event") != "delta":
                pass  # queued, running
            started = time.perf_counter()
            await send(ws, type="cancel", generation_id=gen_id, ref="x")
            seen = []
            while (message := await receive(ws)).get("event") != "cancelled":
                seen.append(message)
                assert message.get("event") in ("delta", None), message
            latencies.append(time.perf_counter() - started)
            if not any(m["type"] == "cancel_accepted" for m in seen):
                seen.append(await receive(ws))  # the reply came after the event
            assert {"type": "cancel_accepted", "generation_id": gen_id, "outcome": "requested",
                    "ref": "x"} in seen
            assert client.status(stack.url, gen_id, ACME)["status"] == "cancelled"
    p50 = statistics.median(latencies) * 1000
    print(f"\ncancel over WebSocket -> cancelled event: p50 {p50:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms (n={len(latencies)})")
    assert p50 < 1000, f"cancel took {p50:.0f} ms (p50)"


BAD_MESSAGES: list[tuple[str | bytes, str]] = [
    ("not json", "invalid_json"),
    (b"\x00binary", "invalid_message"),
    ("[1, 2]", "invalid_message"),
    ('{"type": "launch"}', "invalid_message"),
    ('{"type": "subscribe"}', "invalid_message"),
    ('{"type": "subscribe", "generation_id": "gen_x", "thread_id": "thr_x"}', "invalid_message"),
    ('{"type": "subscribe", "generation_id": "../etc"}', "not_found"),
    ('{"type": "subscribe", "generation_id": "gen_0123456789abcdef0123456789abcdef"}',
     "not_found"),
    ('{"type": "subscribe", "generation_id": "gen_0123456789abcdef0123456789abcdef", '
     '"after": "yesterday"}', "invalid_event_id"),
    ('{"type": "subscribe", "generation_id": 12}', "invalid_message"),
    ('{"type": "unsubscribe", "generation_id": "gen_0123456789abcdef0123456789abcdef"}',
     "not_subscribed"),
    ('{"type": "create"}', "invalid_message"),
    ('{"type": "create", "request": {"model": "fake:lorem"}}', "validation_error"),
    ('{"type": "create", "request": {"prompt": "x", "max_tokens": -1}}', "validation_error"),
    ('{"type": "create", "request": {"prompt": "x", "model": "nope:model"}}', "unknown_model"),
    ('{"type": "create", "request": {"prompt": "\\ud800"}}', "invalid_text"),
    ('{"type": "create", "request": {"prompt": "x"}, "surprise": 1}', "invalid_message"),
    ('{"type": "create", "request": {"prompt": "x"}, "subscribe": "yes"}', "invalid_message"),
    ('{"type": "create", "thread_id": "thr_nope", "request": {"content": "hi"}}', "not_found"),
    ('{"type": "cancel", "generation_id": "gen_0123456789abcdef0123456789abcdef"}', "not_found"),
    ('{"type": "auth", "api_key": "wrong"}', "unauthorized"),
    ('{"type": "auth", "token": "gen_x.1.sig"}', "unauthorized"),
    ('{"type": "auth"}', "invalid_message"),
    ('{"type": "ping", "ref": {"an": "object"}}', "invalid_message"),
    (json.dumps({"type": "create", "request": {"prompt": "x" * 30_000}}), "payload_too_large"),
]


async def test_malformed_messages_get_an_error_and_the_socket_stays_open(stack: Stack) -> None:
    """Every malformed or refused message gets an `error` message with its code (and the message's ref), the socket stays open, and nothing is created."""
    before = stored_generations(stack.redis_url)
    async with connect(ws_url(stack.urls[1]), additional_headers=ACME,
                       max_size=None) as ws:
        for raw, code in BAD_MESSAGES:
            await ws.send(raw)
            answer = await receive(ws)
            assert answer["type"] == "error" and answer["code"] == code, (raw, answer)
            assert answer["message"]
        answer = await reply(ws, type="create", ref=5, request={"prompt": "x", "model": "bad"})
        assert (answer["code"], answer["ref"]) == ("unknown_model", 5)
        assert (await reply(ws, type="ping")) == {"type": "pong"}
    assert stored_generations(stack.redis_url) == before


async def test_subscriptions_are_capped_per_socket_and_a_capped_create_creates_nothing(
    stack: Stack,
) -> None:
    """Past WS_MAX_SUBSCRIPTIONS a subscribe or a create gets `too_many_subscriptions`; a create that does not subscribe still works, and unsubscribing frees a place."""
    gen_ids = [create(stack.url, model="fake:lorem", prompt="x", max_tokens=2000)
               for _ in range(MAX_SUBS + 1)]
    try:
        async with connect(ws_url(stack.urls[0]), additional_headers=ACME) as ws:
            ws_messages: list[dict[str, Any]] = []

            async def answer_to(**message: Any) -> dict[str, Any]:
                await send(ws, **message)
                while (got := await receive(ws))["type"] == "event":
                    ws_messages.append(got)
                return got

            for gen_id in gen_ids[:MAX_SUBS]:
                assert (await answer_to(type="subscribe", generation_id=gen_id))["type"] == \
                    "subscribed"
            before = stored_generations(stack.redis_url)
            full = await answer_to(type="subscribe", generation_id=gen_ids[-1])
            assert full["code"] == "too_many_subscriptions"
            full = await answer_to(type="create", request={"prompt": "x"})
            assert full["code"] == "too_many_subscriptions"
            assert stored_generations(stack.redis_url) == before
            created = await answer_to(type="create", subscribe=False,
                                      request={"prompt": "x", "model": "fake:lorem"})
            assert created["type"] == "created"
            gen_ids.append(created["generation_id"])
            gone = await answer_to(type="unsubscribe", generation_id=gen_ids[0])
            assert gone == {"type": "unsubscribed", "generation_id": gen_ids[0]}
            again = await answer_to(type="subscribe", generation_id=gen_ids[MAX_SUBS])
            assert again["type"] == "subscribed"
            assert ws_messages and {m["generation_id"] for m in ws_messages} <= set(gen_ids)
    finally:
        for gen_id in gen_ids:
            cancel(stack.url, gen_id)


async def test_credentials_origin_and_tokens(stack: Stack) -> None:
    """A bad key in the handshake is 401 and a foreign browser origin 403; a socket without credentials reads nothing until `auth`; a stream token reads its generation only; another tenant's generation is not found."""
    base = stack.urls[0]
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(base), additional_headers={"Authorization": "Bearer no"}):
            pass
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "unauthorized"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(base), origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    host = base.removeprefix("http://")
    for origin in (f"http://{host}", "https://app.example.com"):
        async with connect(ws_url(base), origin=origin) as ws:
            assert (await reply(ws, type="ping")) == {"type": "pong"}

    mine = create(base, model="fake:lorem", prompt="x", max_tokens=3)
    other = create(base, model="fake:lorem", prompt="y", max_tokens=3)
    token = client.create(base, ACME, model="fake:lorem", prompt="z", max_tokens=3)
    async with connect(ws_url(base)) as ws:  # no credentials yet
        answer = await reply(ws, type="subscribe", generation_id=mine)
        assert answer["code"] == "unauthorized"
        answer = await reply(ws, type="create", request={"prompt": "x"})
        assert answer["code"] == "unauthorized"
        answer = await reply(ws, type="auth", token=token["stream_token"], ref=1)
        assert answer == {"type": "authenticated", "scope": token["id"], "ref": 1}
        answer = await reply(ws, type="subscribe", generation_id=token["id"])
        assert answer["type"] == "subscribed"
        got = await events_until_end(ws, {token["id"]})
        assert got[token["id"]] == collect(base, token["id"], headers=ACME)
        answer = await reply(ws, type="subscribe", generation_id=other)
        assert answer["code"] == "unauthorized"  # a token reads its own generation only
        answer = await reply(ws, type="auth", api_key="k-globex")
        assert answer == {"type": "authenticated", "scope": "tenant"}
        answer = await reply(ws, type="subscribe", generation_id=other)
        assert answer["code"] == "not_found"  # acme's, not globex's
        answer = await reply(ws, type="cancel", generation_id=mine)
        assert answer["code"] == "not_found"
    async with connect(ws_url(base, f"?token={token['stream_token']}")) as ws:
        assert (await reply(ws, type="subscribe", generation_id=token["id"]))["type"] == \
            "subscribed"


async def test_thread_messages_over_the_socket(stack: Stack) -> None:
    """A thread message created over the socket is followed there; another socket subscribed by thread_id gets the same answer's events; an idle thread answers with no generation."""
    thread = new_thread(stack.url)
    async with connect(ws_url(stack.urls[0]), additional_headers=ACME) as ws, \
            connect(ws_url(stack.urls[1]), additional_headers=ACME) as watcher:
        created = await reply(ws, type="create", thread_id=thread["id"],
                              request={"content": WORDS})
        assert created["thread_id"] == thread["id"]
        gen_id = created["generation_id"]
        assert (await receive(ws))["type"] == "subscribed"
        answer = await reply(watcher, type="subscribe", thread_id=thread["id"])
        assert answer == {"type": "subscribed", "generation_id": gen_id,
                          "thread_id": thread["id"]}
        mine = await events_until_end(ws, {gen_id})
        theirs = await events_until_end(watcher, {gen_id})
        assert mine == theirs and text_of(mine[gen_id]) == WORDS
        sse = collect(stack.url, gen_id, headers=ACME)
        assert mine[gen_id] == sse
        answer = await reply(watcher, type="subscribe", thread_id=thread["id"])
        assert answer == {"type": "subscribed", "generation_id": None, "thread_id": thread["id"]}


async def test_a_socket_is_a_viewer_for_on_disconnect_cancel(stack: Stack) -> None:
    """A generation created over the socket with on_disconnect cancel counts the socket as its
    viewer: it runs past the grace while subscribed, and is cancelled (abandoned) once the
    socket is gone."""
    async with connect(ws_url(stack.urls[0]), additional_headers=ACME) as ws:
        created = await reply(ws, type="create", request={
            "model": "fake:lorem", "prompt": "x", "max_tokens": 2000, "on_disconnect": "cancel"})
        gen_id = created["generation_id"]
        assert (await receive(ws))["type"] == "subscribed"
        until = time.monotonic() + 3 * GRACE_S
        while time.monotonic() < until:  # reading events for three graces
            assert (await receive(ws))["event"] in ("status", "delta")
        now = client.status(stack.urls[1], gen_id, ACME)
        assert (now["status"], now["viewers"]) == ("running", 1)
    left = time.monotonic()
    await asyncio.to_thread(  # the status, not the events: a reader of those is a viewer
        wait_for, lambda: client.status(stack.urls[1], gen_id, ACME)["status"] == "cancelled",
        GRACE_S + 10, 0.1, "the abandoned generation to end")
    assert time.monotonic() - left >= GRACE_S - 0.2
    events = collect(stack.urls[1], gen_id, headers=ACME)
    assert events[-1].type == "cancelled" and events[-1].data == {"reason": "abandoned"}
