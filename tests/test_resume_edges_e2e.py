"""The edges of resuming and re-posting that real clients hit (issue 11, items 3, 5, 9, 10, 11
and 17), driven by httpx, httpx-sse and the openai SDK against real processes.

- a resume position at or past the terminal event: 204 at once, never pings for ever;
- a re-POST (auto-retrying SSE clients) with ``Last-Event-ID``: continues after it with
  the same Idempotency-Key, is refused without one;
- no event with empty data at the stream's start (the ``retry:`` line);
- a generation past its retention: 410, an unknown id: 404, and asking creates no key;
- an Idempotency-Key is tied to its request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis
from httpx_sse import ServerSentEvent, connect_sse

from tests.client import collect, create, status, stored_generations
from tests.stack import Stack, wait_for
from tokenrelay.shared.ids import new_generation_id

pytestmark = pytest.mark.slow  # starts real processes

STREAM = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """One API process and one worker, a fake provider fast enough to finish soon."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_FAKE_TPS": "100"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def short() -> Iterator[Stack]:
    """An API alone (no worker: what it creates stays queued) whose retention is one second."""
    s = Stack(apis=1, workers=0, in_process=True, env={"TOKENRELAY_RETENTION_S": "1"})
    yield s
    s.stop()


def _events_of(sses: Iterator[ServerSentEvent], limit: int | None = None
               ) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, event, data) of every event httpx-sse yields, until the terminal one or ``limit``;
    an event with empty data fails (a client would json.loads it)."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for sse in sses:
        assert sse.data, f"httpx-sse yielded an event with empty data: {sse!r}"
        out.append((sse.id, sse.event, json.loads(sse.data)))
        if sse.event in ("done", "cancelled", "error") or (limit and len(out) >= limit):
            break
    return out


def _text(events: list[tuple[str, str, dict[str, Any]]]) -> str:
    return "".join(data.get("content", "") for _, kind, data in events if kind == "delta")


# --- 3: a resume position at or past the end ------------------------------------------------

def test_resume_at_or_past_the_terminal_event_is_204_at_once(stack: Stack) -> None:
    """Last-Event-ID or ?after= equal to the terminal event's id, or later, answers 204."""
    gen = create(stack.url, model="fake:echo", prompt="one two three")
    events = collect(stack.url, gen["id"])
    end = events[-1]
    assert end.type == "done"
    ms, seq = end.id.split("-")
    later = f"{int(ms) + 5}-0"
    url = f"{stack.url}/v1/generations/{gen['id']}/events"
    asks: list[dict[str, Any]] = [
        {"headers": {"Last-Event-ID": end.id}}, {"params": {"after": end.id}},
        {"headers": {"Last-Event-ID": later}}, {"params": {"after": f"{ms}-{int(seq) + 1}"}},
    ]
    for ask in asks:
        with httpx.stream("GET", url, timeout=httpx.Timeout(5, read=3), **ask) as response:
            assert response.status_code == 204, ask
            assert response.read() == b""
    # One event before the end still gets that end, and the stream closes after it.
    rest = collect(stack.url, gen["id"], after=events[-2].id, timeout=5)
    assert [e.type for e in rest] == ["done"]


# --- 9: no empty event at the start ---------------------------------------------------------

def test_httpx_sse_sees_no_empty_event_and_keeps_the_retry(stack: Stack) -> None:
    """The first event httpx-sse yields is the `queued` status, carrying `retry: 1000`."""
    gen = create(stack.url, model="fake:echo", prompt="hello there")
    with httpx.Client(timeout=10) as client, connect_sse(
        client, "GET", f"{stack.url}/v1/generations/{gen['id']}/events"
    ) as source:
        sses = source.iter_sse()
        first = next(sses)
        assert (first.event, first.data, first.retry) == ("status", '{"status":"queued"}', 1000)
        rest = _events_of(sses)
    assert _text(rest) == "hello there"


# --- 5: Last-Event-ID on a re-POST ----------------------------------------------------------

def test_repost_with_last_event_id_continues_after_it(stack: Stack) -> None:
    """A dropped one-call POST, re-sent with its Idempotency-Key and Last-Event-ID, continues
    exactly after that event: the two parts make the whole text, no event twice."""
    body = {"model": "fake:lorem", "prompt": "x", "max_tokens": 30}
    hdrs = {**STREAM, "Idempotency-Key": uuid.uuid4().hex}
    with httpx.Client(timeout=10) as client:
        with connect_sse(client, "POST", f"{stack.url}/v1/generations", json=body,
                         headers=hdrs) as source:
            gen_id = source.response.headers["x-generation-id"]
            first = _events_of(source.iter_sse(), limit=5)
        with connect_sse(client, "POST", f"{stack.url}/v1/generations", json=body,
                         headers={**hdrs, "Last-Event-ID": first[-1][0]}) as source:
            assert source.response.headers["x-generation-id"] == gen_id
            rest = _events_of(source.iter_sse())
    ids = [event_id for event_id, _, _ in first + rest]
    assert len(set(ids)) == len(ids), "an event came twice"
    assert rest[-1][1] == "done"
    assert _text(first) + _text(rest) == status(stack.url, gen_id)["content"]
    # At the end, the re-POST is like the GET: nothing to resume.
    response = httpx.post(f"{stack.url}/v1/generations", json=body,
                          headers={**hdrs, "Last-Event-ID": rest[-1][0]}, timeout=5)
    assert response.status_code == 204


def test_repost_with_last_event_id_but_no_key_is_refused(stack: Stack, short: Stack) -> None:
    """Without an Idempotency-Key a re-POST cannot be matched: 400, and nothing is created."""
    before = stored_generations(stack.redis_url)
    response = httpx.post(f"{stack.url}/v1/generations", headers={**STREAM, "Last-Event-ID": "1-0"},
                          json={"model": "fake:echo", "prompt": "again"}, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "idempotency_key_required"
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(
                model="fake:echo", messages=[{"role": "user", "content": "again"}], stream=True,
                extra_headers={"Last-Event-ID": "1-0"})
    assert raised.value.code == "idempotency_key_required"
    thread = httpx.post(f"{short.url}/v1/threads", json={}, timeout=5).json()
    before_short = stored_generations(short.redis_url)
    response = httpx.post(f"{short.url}/v1/threads/{thread['id']}/messages", timeout=5,
                          headers={**STREAM, "Last-Event-ID": "1-0"}, json={"content": "again"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "idempotency_key_required"
    assert stored_generations(stack.redis_url) == before
    assert stored_generations(short.redis_url) == before_short


def test_chat_completions_repost_with_last_event_id_continues(stack: Stack) -> None:
    """The facade too: a stream re-sent by the openai SDK with the same Idempotency-Key and
    the last chunk's id gets only the chunks after it."""
    key = uuid.uuid4().hex
    request = {"model": "fake:lorem", "max_tokens": 30, "stream": True,
               "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(timeout=10) as client, connect_sse(
        client, "POST", f"{stack.url}/v1/chat/completions", json=request,
        headers={"Idempotency-Key": key}
    ) as source:
        gen_id = source.response.headers["x-generation-id"]
        first, last_id = "", ""
        for sse in source.iter_sse():
            chunk = json.loads(sse.data)
            first += chunk["choices"][0]["delta"].get("content") or ""
            last_id = sse.id
            if first.count(" ") >= 3:
                break
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="fake:lorem", max_tokens=30, stream=True,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"Idempotency-Key": key, "Last-Event-ID": last_id})
        rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert first + rest == status(stack.url, gen_id)["content"]
    assert len((first + rest).split()) == 30


# --- 17: an Idempotency-Key is tied to its request ------------------------------------------

def test_idempotency_key_reused_for_another_request_is_refused(stack: Stack) -> None:
    """Same key, same request: the earlier generation. Same key, another prompt or another
    endpoint: 422 `idempotency_key_reused` (400 in OpenAI's shape on the facade), nothing made."""
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"model": "fake:echo", "prompt": "first prompt"}
    gen = create(stack.url, headers=key, **body)
    assert create(stack.url, headers=key, **body)["id"] == gen["id"]
    before = stored_generations(stack.redis_url)
    other = httpx.post(f"{stack.url}/v1/generations", headers=key, timeout=5,
                       json={**body, "prompt": "another prompt"})
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(
                model="fake:echo", messages=[{"role": "user", "content": "first prompt"}],
                extra_headers=key)
        assert raised.value.code == "idempotency_key_reused"
        # And the other way round: a key first used on the facade.
        facade_key = {"Idempotency-Key": uuid.uuid4().hex}
        done = client.chat.completions.create(
            model="fake:echo", messages=[{"role": "user", "content": "facade"}],
            extra_headers=facade_key)
        again = client.chat.completions.create(
            model="fake:echo", messages=[{"role": "user", "content": "facade"}],
            extra_headers=facade_key)
        assert again.id == done.id and again.choices[0].message.content == "facade"
    before = stored_generations(stack.redis_url)
    native = httpx.post(f"{stack.url}/v1/generations", headers=facade_key, timeout=5,
                        json={"model": "fake:echo", "prompt": "facade"})
    assert native.status_code == 422
    assert native.json()["error"]["code"] == "idempotency_key_reused"
    assert stored_generations(stack.redis_url) == before


# --- 10: expired 410, unknown 404 -----------------------------------------------------------

def test_expired_generation_is_410_and_an_unknown_one_404(short: Stack) -> None:
    """Once a generation's retention is over, status, events and cancel say 410 `gone`; an id
    that never existed (new or old format) stays 404."""
    gen = create(short.url, model="fake:echo", prompt="soon gone")
    assert httpx.post(f"{short.url}/v1/generations/{gen['id']}/cancel", timeout=5).status_code == 202
    base = f"{short.url}/v1/generations"
    wait_for(lambda: httpx.get(f"{base}/{gen['id']}", timeout=5).status_code != 200, 15,
             what="the cancelled generation's keys to expire")
    for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
        response = httpx.request(method, f"{base}/{gen['id']}{path}", timeout=5)
        assert response.status_code == 410, (path, response.text)
        assert response.json()["error"]["code"] == "gone"
    for unknown in (new_generation_id(), "gen_" + uuid.uuid4().hex):
        for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel")):
            response = httpx.request(method, f"{base}/{unknown}{path}", timeout=5)
            assert response.status_code == 404, (unknown, path, response.text)


# --- 11: asking about an unknown id creates nothing -----------------------------------------

def test_unknown_id_creates_no_redis_key(short: Stack) -> None:
    """With the hub reading a live stream (its XREAD in flight), a status, events or cancel
    request for an unknown id leaves every Redis key as it was."""
    gen = create(short.url, model="fake:echo", prompt="nobody runs me")
    client = redis.Redis.from_url(short.redis_url)
    try:
        with httpx.stream("GET", f"{short.url}/v1/generations/{gen['id']}/events",
                          timeout=httpx.Timeout(10, read=30)) as viewer:
            seen = b""
            for chunk in viewer.iter_bytes():
                seen += chunk
                if b'"queued"' in seen:
                    break
            wait_for(lambda: any(c.get("cmd") == "xread" for c in client.client_list()), 10,
                     what="the hub's XREAD to be in flight")
            before = set(client.keys("*"))
            for unknown in (new_generation_id(), new_generation_id()):
                base = f"{short.url}/v1/generations/{unknown}"
                assert httpx.get(f"{base}/events", timeout=5).status_code == 404
                assert httpx.get(base, timeout=5).status_code == 404
                assert httpx.post(f"{base}/cancel", timeout=5).status_code == 404
            assert set(client.keys("*")) == before
    finally:
        client.close()
