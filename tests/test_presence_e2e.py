"""Presence and on_disconnect end to end: two API processes, two workers, a private Redis,
a local OpenAI-compatible test server, and the real openai SDK."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from tests.client import collect, create, status, stored_generations, text_of
from tests.fake_upstream import Record, fake_upstream
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.slow  # starts real processes

GRACE_S = 2.0
TTL_S = 3.0  # PRESENCE_TTL_S (the default), refreshed every second


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Stack, Record]]:
    with fake_upstream() as (base_url, record):
        s = Stack(apis=2, workers=2, env={
            "TOKENRELAY_OPENAI_BASE_URL": base_url,
            "TOKENRELAY_OPENAI_API_KEY": "test-key",
            "TOKENRELAY_ABANDON_GRACE_S": str(GRACE_S),
        })
        try:
            yield s, record
        finally:
            s.stop()


@pytest.fixture
def stack(env: tuple[Stack, Record]) -> Stack:
    return env[0]


def viewers(base: str, gen_id: str) -> int:
    count: int = status(base, gen_id)["viewers"]
    return count


@contextlib.contextmanager
def watching(bases: list[str], gen_id: str) -> Iterator[contextlib.ExitStack]:
    """An open event stream of ``gen_id`` on each of ``bases`` (not read: only connected);
    each is its own ExitStack entry, closed at the end or by the caller."""
    with contextlib.ExitStack() as streams:
        for base in bases:
            client = streams.enter_context(httpx.Client(timeout=10))
            response = streams.enter_context(
                client.stream("GET", f"{base}/v1/generations/{gen_id}/events"))
            assert response.status_code == 200
        yield streams


def lorem(base: str, words: int, **body: Any) -> str:
    gen_id: str = create(base, model="fake:lorem", max_tokens=words, prompt="x", **body)["id"]
    return gen_id


def test_viewers_count_every_viewer_on_every_api_process(stack: Stack) -> None:
    """`viewers` in the status is the viewers of both processes, whichever one answers,
    SSE viewers and facade streams alike; it follows them as they leave."""
    a, b = stack.urls[:2]
    gen_id = lorem(a, 300)
    with watching([a, a, a], gen_id) as on_a, watching([b, b], gen_id):
        for base in (a, b):
            wait_for(lambda base=base: viewers(base, gen_id) == 5, 5, 0.05, "5 viewers")
        on_a.close()
        wait_for(lambda: viewers(a, gen_id) == 2, 5, 0.05, "2 viewers")
    wait_for(lambda: viewers(b, gen_id) == 0, 5, 0.05, "no viewer")

    client = openai.OpenAI(base_url=f"{b}/v1", api_key="unused", max_retries=0)
    with client.chat.completions.create(model="fake:lorem", max_tokens=300, stream=True,
                                        messages=[{"role": "user", "content": "x"}]) as chunks:
        first = next(iter(chunks))
        wait_for(lambda: viewers(a, first.id) == 1, 5, 0.05, "the facade stream counted")


def test_a_killed_api_process_stops_counting_within_seconds(stack: Stack) -> None:
    """kill -9 of an API process with viewers: its viewers leave the count once its last
    refresh expires (PRESENCE_TTL_S), while the other process's still count."""
    doomed = stack.add_api()
    base = f"http://127.0.0.1:{stack.ports[-1]}"
    stack.wait_ready(base)
    gen_id = lorem(stack.url, 600)
    with watching([stack.url], gen_id), watching([base] * 4, gen_id):
        wait_for(lambda: viewers(stack.url, gen_id) == 5, 5, 0.05, "5 viewers")
        killed = time.monotonic()
        doomed.kill()
        wait_for(lambda: viewers(stack.url, gen_id) == 1, TTL_S + 3, 0.05,
                 "the killed process's viewers to expire")
        dropped_s = time.monotonic() - killed
    print(f"\nmeasured: a killed API process's viewers stopped counting after {dropped_s:.2f}s")
    assert dropped_s <= TTL_S + 1.5


def test_abandoned_generation_is_cancelled_and_its_upstream_closed(
        env: tuple[Stack, Record]) -> None:
    """on_disconnect cancel: the last viewer leaves, nobody comes back for the grace ->
    cancelled (reason abandoned), and the upstream test server sees its stream closed."""
    stack, record = env
    before = record.disconnected
    body = {"model": "openai:slow", "prompt": "x", "on_disconnect": "cancel"}
    with httpx.Client(timeout=10) as client, connect_sse(
            client, "POST", f"{stack.url}/v1/generations", json=body) as source:
        gen_id = source.response.headers["X-Generation-Id"]
        for sse in source.iter_sse():
            if sse.event == "delta":
                break
    left = time.monotonic()
    wait_for(lambda: record.disconnected > before, GRACE_S + 5, 0.02, "the upstream closed")
    closed_s = record.disconnected_at[-1] - left
    print(f"\nmeasured: upstream closed {closed_s:.2f}s after the last viewer left "
          f"(ABANDON_GRACE_S={GRACE_S:g})")
    assert GRACE_S - 0.2 <= closed_s <= GRACE_S + 2.5
    events = wait_for(lambda: (e := collect(stack.urls[1], gen_id))[-1].terminal and e)
    assert events[-1].type == "cancelled" and events[-1].data == {"reason": "abandoned"}
    assert status(stack.urls[1], gen_id)["status"] == "cancelled"


def test_a_viewer_back_within_the_grace_keeps_it_running(stack: Stack) -> None:
    """The viewer drops and resumes on the other process within the grace: the generation
    runs to its end, and the text read before and after is the whole answer."""
    a, b = stack.urls[:2]
    gen_id = lorem(a, 120, on_disconnect="cancel")  # 4 s at 30 words/s: longer than the grace
    first = collect(a, gen_id, limit=10)
    time.sleep(GRACE_S / 2)  # not a wait for a condition: the gap is the scenario
    rest = collect(b, gen_id, after=first[-1].id)
    assert rest[-1].type == "done"
    assert len((text_of(first) + text_of(rest)).split()) == 120


def test_a_thread_message_nobody_watches_any_more_is_cancelled(stack: Stack) -> None:
    """A thread message posted with on_disconnect cancel: its thread stream's viewer counts
    (`viewers` of the thread too); once it leaves, the answer is cancelled after the grace
    and the thread keeps its partial text, marked cancelled."""
    a, b = stack.urls[:2]
    thread_url = f"{a}/v1/threads/{httpx.post(f'{a}/v1/threads', timeout=10).json()['id']}"
    response = httpx.post(f"{thread_url}/messages", timeout=10, json={
        "content": "x", "model": "fake:lorem", "max_tokens": 600, "on_disconnect": "cancel"})
    assert response.status_code == 202, response.text
    gen_id = response.json()["id"]
    with httpx.Client(timeout=10) as client, client.stream(
            "GET", f"{thread_url.replace(a, b)}/stream") as stream:
        assert stream.status_code == 200
        wait_for(lambda: httpx.get(thread_url, timeout=10).json()["viewers"] == 1, 5, 0.05,
                 "the thread's viewer")
    wait_for(lambda: status(a, gen_id)["status"] == "cancelled", GRACE_S + 5, 0.1, "cancelled")
    thread = httpx.get(thread_url, timeout=10).json()
    assert thread["messages"][-1]["status"] == "cancelled" and thread["messages"][-1]["content"]
    assert thread["viewers"] == 0


def test_facade_stream_closed_by_the_sdk_stops_the_upstream(env: tuple[Stack, Record]) -> None:
    """The openai SDK closes its stream: by default the facade cancels after the grace and
    the upstream's connection is closed, as OpenAI's own streams stop."""
    stack, record = env
    before = record.disconnected
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    chunks = client.chat.completions.create(
        model="openai:slow", stream=True, messages=[{"role": "user", "content": "x"}])
    gen_id = ""
    for chunk in chunks:
        gen_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            break
    chunks.close()
    left = time.monotonic()
    wait_for(lambda: record.disconnected > before, GRACE_S + 5, 0.02, "the upstream closed")
    print(f"\nmeasured: facade: upstream closed {record.disconnected_at[-1] - left:.2f}s "
          "after the SDK closed its stream")
    assert status(stack.url, gen_id)["status"] == "cancelled"


def test_facade_request_given_up_by_the_sdk_stops_the_upstream(
        env: tuple[Stack, Record]) -> None:
    """A non-stream chat completion whose client gives up (the SDK's timeout) is cancelled
    after the grace too, its upstream connection closed."""
    stack, record = env
    before = record.disconnected
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0,
                           timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="openai:slow",
                                       messages=[{"role": "user", "content": "x"}])
    wait_for(lambda: record.disconnected > before, GRACE_S + 5, 0.02, "the upstream closed")


def test_facade_opt_in_continue_keeps_going_without_its_client(stack: Stack) -> None:
    """extra_body on_disconnect continue: the SDK leaves, the generation runs to its end and
    is read through the native API by its id."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    chunks = client.chat.completions.create(
        model="fake:lorem", max_tokens=120, stream=True,
        messages=[{"role": "user", "content": "x"}], extra_body={"on_disconnect": "continue"})
    gen_id = next(iter(chunks)).id
    chunks.close()
    events = collect(stack.urls[1], gen_id, limit=1)  # a glance, then nobody watches
    assert events
    done = wait_for(lambda: (s := status(stack.url, gen_id))["status"] != "running" and s,
                    10, 0.2, "the end")
    assert done["status"] == "completed" and len(done["content"].split()) == 120


def test_bad_on_disconnect_is_refused_and_creates_nothing(stack: Stack) -> None:
    """An unknown on_disconnect is a 422 natively and a 400 on the facade; nothing stored."""
    before = stored_generations(stack.redis_url)
    native = httpx.post(f"{stack.url}/v1/generations", timeout=10,
                        json={"prompt": "x", "on_disconnect": "later"})
    assert native.status_code == 422 and native.json()["error"]["code"]
    facade = httpx.post(f"{stack.url}/v1/chat/completions", timeout=10, content=json.dumps(
        {"model": "fake:echo", "messages": [{"role": "user", "content": "x"}],
         "on_disconnect": "later"}))
    assert facade.status_code == 400 and facade.json()["error"]["param"] == "on_disconnect"
    assert stored_generations(stack.redis_url) == before
