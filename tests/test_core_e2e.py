"""Core pipeline acceptance, end to end: real API and worker processes on a private Redis."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.client import collect, create, status, text_of
from tests.fake_upstream import Record, fake_upstream
from tests.stack import Stack, wait_for
from tokenrelay.shared.events import Event, parse_id

pytestmark = pytest.mark.slow  # starts real processes


def _assert_well_formed(events: list[Event]) -> None:
    ids = [parse_id(e.id) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "ids must strictly increase"
    assert (events[0].type, events[0].data) == ("status", {"status": "queued"})
    assert [e.terminal for e in events].count(True) == 1 and events[-1].terminal


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "fake:lorem", "prompt": "x", "max_tokens": 20}, None),
        # fake:echo gives the prompt back as sent: its spaces and newlines too (issue 12)
        ({"model": "fake:echo", "messages": [{"role": "user", "content": "one two  three"}]},
         "one two  three"),
        ({"model": "fake:echo", "prompt": "def f():\n    return 1\n\nprint(f())\n"},
         "def f():\n    return 1\n\nprint(f())\n"),
    ],
)
def test_delta_content_equals_status_content(stack: Stack, body: dict, expected: str | None) -> None:
    """Concatenated deltas equal the status content; ids increase; the first event is queued."""
    gen = create(stack.url, **body)
    events = collect(stack.url, gen["id"])
    _assert_well_formed(events)
    final = status(stack.url, gen["id"])
    assert final["status"] == "completed"
    assert text_of(events) == final["content"]
    if expected is not None:
        assert final["content"] == expected
    else:
        assert len(final["content"].split()) == 20
        assert events[-1].data["finish_reason"] == "length"
    assert events[-1].data["usage"] == final["usage"]


def test_status_queued_is_readable_before_a_worker_takes_the_job() -> None:
    """With no worker running, the stream already holds `status: queued` and the status says queued."""
    s = Stack(apis=1, workers=0, in_process=True)
    try:
        gen = create(s.url, model="fake:echo", prompt="hi there")
        assert status(s.url, gen["id"])["status"] == "queued"
        assert collect(s.url, gen["id"], limit=1)[0].data == {"status": "queued"}
        s.add_worker()
        events = collect(s.url, gen["id"])
        assert text_of(events) == "hi there"
    finally:
        s.stop()


def test_resume_after_every_k_on_either_api_process(stack2: Stack) -> None:
    """A viewer that drops after k events and resumes anywhere gets exactly the rest, for every k."""
    gen = create(stack2.urls[0], model="fake:lorem", prompt="x", max_tokens=47)  # 50 events

    def drop_and_resume(k: int) -> list[Event]:
        first = collect(stack2.urls[k % 2], gen["id"], limit=k) if k else []
        after = first[-1].id if first else None
        rest = collect(stack2.urls[(k // 2) % 2], gen["id"], after=after)
        return first + rest

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(drop_and_resume, range(50)))
    reference = collect(stack2.urls[1], gen["id"])
    assert len(reference) == 50
    _assert_well_formed(reference)
    for k, events in enumerate(results):
        assert events == reference, f"k={k}"


def test_twenty_viewers_on_two_api_processes_see_identical_events(stack2: Stack) -> None:
    """20 viewers spread over two API processes (two workers) receive identical event lists."""
    gens = [create(stack2.urls[i % 2], model="fake:lorem", prompt="x", max_tokens=30)
            for i in range(2)]
    with ThreadPoolExecutor(max_workers=40) as pool:
        futures = {g["id"]: [pool.submit(collect, stack2.urls[i % 2], g["id"]) for i in range(20)]
                   for g in gens}
        for gen_id, viewers in futures.items():
            lists = [f.result() for f in viewers]
            assert all(events == lists[0] for events in lists)
            _assert_well_formed(lists[0])
            assert text_of(lists[0]) == status(stack2.url, gen_id)["content"]


def test_fake_error_ends_with_exactly_one_error_event(stack: Stack) -> None:
    """fake:error streams a few words, then exactly one `error` terminal event; status failed."""
    gen = create(stack.url, model="fake:error", prompt="x")
    events = collect(stack.url, gen["id"])
    _assert_well_formed(events)
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "upstream_error"
    final = status(stack.url, gen["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "upstream_error"
    assert final["content"] == text_of(events) != ""


@pytest.fixture(scope="module")
def openai_stack() -> Iterator[tuple[Stack, Record]]:
    with fake_upstream() as (base_url, record):
        s = Stack(apis=1, workers=1, env={"TOKENRELAY_OPENAI_BASE_URL": base_url,
                                          "TOKENRELAY_OPENAI_API_KEY": "test-key"})
        try:
            yield s, record
        finally:
            s.stop()


def test_openai_provider_streams_with_usage(openai_stack: tuple[Stack, Record]) -> None:
    """The openai: provider streams from an OpenAI-compatible server; usage lands in done and status."""
    s, record = openai_stack
    gen = create(s.url, model="openai:echo-model", prompt="hello from the upstream")
    events = collect(s.url, gen["id"])
    _assert_well_formed(events)
    final = status(s.url, gen["id"])
    assert final["content"] == text_of(events) == "hello from the upstream"
    expected_usage = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert events[-1].data["usage"] == expected_usage == final["usage"]
    sent = record.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_cancel_mid_stream_closes_the_upstream_connection(
    openai_stack: tuple[Stack, Record],
) -> None:
    """Cancel mid-stream: `cancelled` arrives, status is cancelled, the upstream sees its connection closed."""
    s, record = openai_stack
    before = record.disconnected
    gen = create(s.url, model="openai:slow", prompt="go")
    first = collect(s.url, gen["id"], limit=5)  # queued, running, 3 deltas: mid-stream
    assert first[-1].type == "delta"
    response = httpx.post(f"{s.url}/v1/generations/{gen['id']}/cancel")
    assert response.status_code == 202
    rest = collect(s.url, gen["id"], after=first[-1].id)
    assert rest[-1].type == "cancelled"
    assert status(s.url, gen["id"])["status"] == "cancelled"
    wait_for(lambda: record.disconnected > before, 5, what="upstream connection closed")
    again = httpx.post(f"{s.url}/v1/generations/{gen['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "already_ended"


def test_cancel_after_the_end_is_409(stack: Stack) -> None:
    """Cancel of a completed generation answers 409 with the error body."""
    gen = create(stack.url, model="fake:echo", prompt="short")
    collect(stack.url, gen["id"])
    response = httpx.post(f"{stack.url}/v1/generations/{gen['id']}/cancel")
    assert response.status_code == 409
    assert set(response.json()["error"]) == {"code", "message"}


def test_cancel_while_queued_ends_at_once() -> None:
    """A queued generation (no worker yet) cancels immediately; a later worker does not run it."""
    s = Stack(apis=1, workers=0, in_process=True)
    try:
        gen = create(s.url, model="fake:lorem", prompt="x", max_tokens=5)
        assert httpx.post(f"{s.url}/v1/generations/{gen['id']}/cancel").status_code == 202
        events = collect(s.url, gen["id"])
        assert [e.type for e in events] == ["status", "cancelled"]
        s.add_worker()
        client = redis.Redis.from_url(s.redis_url)
        wait_for(lambda: client.zcard("tr:queue") == 0, 10, what="worker took the job")
        client.close()
        assert status(s.url, gen["id"])["status"] == "cancelled"
        assert [e.type for e in collect(s.url, gen["id"])] == ["status", "cancelled"]
    finally:
        s.stop()


def _generation_keys(stack: Stack) -> set[bytes]:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return set(client.scan_iter(match="tr:{gen_*"))
    finally:
        client.close()


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status_code", "code"),
    [
        ("POST", "/v1/generations", {"content": b"{not json"}, 400, "invalid_json"),
        ("POST", "/v1/generations", {"content": b"{not json",
                                     "headers": {"content-type": "text/plain"}}, 400,
         "invalid_json"),
        ("POST", "/v1/generations", {"json": {"model": "nope:x", "prompt": "hi"}}, 400,
         "unknown_model"),
        ("POST", "/v1/generations", {"json": {"model": "fake:nope", "prompt": "hi"}}, 400,
         "unknown_model"),
        ("POST", "/v1/generations", {"json": {"model": "fake:echo"}}, 422, "validation_error"),
        ("POST", "/v1/generations", {"json": {"model": "fake:echo", "prompt": "x",
                                              "max_tokens": -1}}, 422, "validation_error"),
        ("POST", "/v1/generations", {"json": {"model": "fake:echo", "prompt": "x",
                                              "max_tokens": 10**9}}, 422, "validation_error"),
        ("GET", "/v1/generations/gen_00000000000000000000000000000000", {}, 404, "not_found"),
        ("GET", "/v1/generations/not-an-id", {}, 404, "not_found"),
        ("GET", "/v1/generations/gen_00000000000000000000000000000000/events", {}, 404,
         "not_found"),
        ("POST", "/v1/generations/gen_00000000000000000000000000000000/cancel", {}, 404,
         "not_found"),
        ("GET", "/no/such/route", {}, 404, "not_found"),
        ("DELETE", "/v1/generations", {}, 405, "method_not_allowed"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_creates_nothing(
    stack: Stack, method: str, path: str, kwargs: dict, status_code: int, code: str
) -> None:
    """Bad requests get the documented 4xx and error body, and no generation is created."""
    before = _generation_keys(stack)
    response = httpx.request(method, f"{stack.url}{path}", timeout=10, **kwargs)
    assert response.status_code == status_code, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert _generation_keys(stack) == before


@pytest.mark.parametrize("bad", ["abc", "1-", "-1", "1-2-3", "99999999999999999999999-0"])
def test_malformed_last_event_id_is_400(stack: Stack, bad: str) -> None:
    """A malformed Last-Event-ID header or ?after= is a 400 with the error body."""
    gen = create(stack.url, model="fake:echo", prompt="x")
    url = f"{stack.url}/v1/generations/{gen['id']}/events"
    by_header = httpx.get(url, headers={"Last-Event-ID": bad})
    by_query = httpx.get(url, params={"after": bad})
    for response in (by_header, by_query):
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_event_id"


def test_post_with_accept_event_stream_streams_in_one_call(stack: Stack) -> None:
    """POST with Accept: text/event-stream answers with the stream and X-Generation-Id."""
    from httpx_sse import connect_sse

    with httpx.Client(timeout=30) as client, connect_sse(
        client, "POST", f"{stack.url}/v1/generations",
        json={"model": "fake:echo", "prompt": "stream me now"},
    ) as source:
        gen_id = source.response.headers["x-generation-id"]
        events = [Event(s.id, s.event, s.json()) for s in source.iter_sse() if s.data]
    _assert_well_formed(events)
    assert text_of(events) == status(stack.url, gen_id)["content"] == "stream me now"


def test_create_answers_202_with_location_and_token(stack: Stack) -> None:
    """Create answers 202 with id, queued status, events_url, a stream token and a Location header."""
    response = httpx.post(f"{stack.url}/v1/generations", json={"model": "fake:echo", "prompt": "a"})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["model"] == "fake:echo"
    assert response.headers["location"] == f"/v1/generations/{body['id']}"
    assert body["events_url"] == f"/v1/generations/{body['id']}/events"
    assert body["stream_token"]


def test_heartbeat_comment_while_idle() -> None:
    """An idle stream gets a `: ping` comment every HEARTBEAT_S, and starts with a retry line."""
    s = Stack(apis=1, workers=0, in_process=True, env={"TOKENRELAY_HEARTBEAT_S": "0.2"})
    try:
        gen = create(s.url, model="fake:echo", prompt="x")
        with httpx.stream("GET", f"{s.url}/v1/generations/{gen['id']}/events", timeout=10) as r:
            seen = ""
            for chunk in r.iter_text():
                seen += chunk
                if ": ping" in seen:
                    break
        assert seen.startswith("retry: 1000\nid: ")  # one block with the first event
        assert ": ping\n" in seen
    finally:
        s.stop()


def test_every_cancel_stops_a_fast_generation() -> None:
    """Twenty cancels, each soon after a fast generation starts, all end it (none is swallowed)."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_FAKE_TPS": "300"})
    try:
        for _ in range(20):
            gen = create(s.url, model="fake:lorem", prompt="x", max_tokens=20000)
            first = collect(s.url, gen["id"], limit=4)
            assert httpx.post(f"{s.url}/v1/generations/{gen['id']}/cancel").status_code == 202
            gen_id = gen["id"]
            wait_for(lambda: status(s.url, gen_id)["status"] == "cancelled", 5,  # noqa: B023
                     what=f"cancel of {gen_id} to take effect")
            rest = collect(s.url, gen["id"], after=first[-1].id)
            assert rest[-1].type == "cancelled"
    finally:
        s.stop()
