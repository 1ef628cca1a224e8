"""Threads end to end: two API processes, two workers, a private Redis, a fake upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import connect_sse

from tests.client import collect, text_of
from tests.fake_upstream import Record, fake_upstream
from tests.stack import Stack, wait_for
from tokenrelay.shared.events import Event, parse_id

pytestmark = pytest.mark.slow  # starts real processes


ACME = {"Authorization": "Bearer k-acme"}
GLOBEX = {"Authorization": "Bearer k-globex"}
MAX_CHARS = 1000
MAX_BODY = 20_000


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Stack, Record]]:
    with fake_upstream() as (base_url, record):
        s = Stack(apis=2, workers=2, env={
            "TOKENRELAY_API_KEYS": "acme:k-acme,globex:k-globex",
            "TOKENRELAY_OPENAI_BASE_URL": base_url,
            "TOKENRELAY_OPENAI_API_KEY": "test-key",
            "TOKENRELAY_THREAD_MAX_MESSAGE_CHARS": str(MAX_CHARS),
            "TOKENRELAY_MAX_BODY_BYTES": str(MAX_BODY),
        })
        try:
            yield s, record
        finally:
            s.stop()


@pytest.fixture
def stack(env: tuple[Stack, Record]) -> Stack:
    return env[0]


def new_thread(base: str, headers: dict[str, str] = ACME, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{base}/v1/threads", json=body, headers=headers, timeout=10)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def post(base: str, thread_id: str, content: str, headers: dict[str, str] = ACME,
         **body: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/threads/{thread_id}/messages",
                      json={"content": content, **body}, headers=headers, timeout=10)


def posted(base: str, thread_id: str, content: str, **body: Any) -> dict[str, Any]:
    response = post(base, thread_id, content, **body)
    assert response.status_code == 202, response.text
    data: dict[str, Any] = response.json()
    return data


def thread(base: str, thread_id: str, headers: dict[str, str] = ACME) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/threads/{thread_id}", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def idle(base: str, thread_id: str) -> dict[str, Any]:
    """The thread once no answer runs (every reply recorded)."""
    return wait_for(lambda: (t := thread(base, thread_id))["active_generation_id"] is None and t,
                    20, 0.05, f"{thread_id} idle")


def stream_thread(base: str, thread_id: str, after: str | None = None, limit: int | None = None,
                  params: dict[str, str] | None = None,
                  headers: dict[str, str] | None = ACME) -> tuple[int, list[Event]]:
    """(status, events) of GET /v1/threads/{id}/stream: to the terminal event, or ``limit``."""
    hdrs = dict(headers or {})
    if after is not None:
        hdrs["Last-Event-ID"] = after
    out: list[Event] = []
    with httpx.Client(timeout=httpx.Timeout(10.0, read=30.0)) as client, connect_sse(
        client, "GET", f"{base}/v1/threads/{thread_id}/stream", headers=hdrs, params=params
    ) as source:
        if source.response.status_code != 200:
            return source.response.status_code, out
        for sse in source.iter_sse():
            if sse.data:
                out.append(Event(sse.id, sse.event, json.loads(sse.data)))
                if out[-1].terminal or (limit is not None and len(out) >= limit):
                    break
    return 200, out


def post_streaming(base: str, thread_id: str, content: str, **body: Any) -> list[Event]:
    """POST a message with Accept: text/event-stream; the events of its answer."""
    with httpx.Client(timeout=30) as client, connect_sse(
        client, "POST", f"{base}/v1/threads/{thread_id}/messages",
        json={"content": content, **body}, headers={**ACME},  # (connect_sse edits the dict)
    ) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["x-thread-id"] == thread_id
        return [Event(s.id, s.event, s.json()) for s in source.iter_sse() if s.data]


def conversation(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in body["messages"]]


def test_three_turns_send_the_whole_history_in_order(env: tuple[Stack, Record]) -> None:
    """Each turn sends system + every earlier turn to the upstream; the thread holds what was streamed."""
    stack, record = env
    t = new_thread(stack.urls[0], system="You are terse.", model="openai:thread-echo")
    questions = ["first question here", "and a second one", "third and last"]
    streamed: list[str] = []
    for i, question in enumerate(questions):
        events = post_streaming(stack.urls[i % 2], t["id"], question)
        assert events[0].data == {"status": "queued"} and events[-1].type == "done"
        streamed.append(text_of(events))
    assert streamed == questions  # the upstream echoes the last user message
    sent = [r["messages"] for r in record.requests if r["model"] == "thread-echo"]
    expected: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
    for question, answer, messages in zip(questions, streamed, sent, strict=True):
        expected.append({"role": "user", "content": question})
        assert [{"role": m["role"], "content": m["content"]} for m in messages] == expected
        expected.append({"role": "assistant", "content": answer})
    body = idle(stack.urls[1], t["id"])
    assert conversation(body) == [(m["role"], m["content"]) for m in expected[1:]]
    assistants = [m for m in body["messages"] if m["role"] == "assistant"]
    assert [m["status"] for m in assistants] == ["completed"] * 3
    assert all(m["finish_reason"] == "stop" and m["usage"]["total_tokens"] for m in assistants)
    assert body["usage"]["total_tokens"] == sum(m["usage"]["total_tokens"] for m in assistants)


def test_reload_mid_answer_resumes_on_the_other_api_process(stack: Stack) -> None:
    """A viewer drops mid-answer on API 1; the thread stream on API 2 with Last-Event-ID gives
    exactly the rest; afterwards it answers 204 and the thread holds the whole answer."""
    t = new_thread(stack.urls[0], model="fake:lorem")
    gen = posted(stack.urls[0], t["id"], "write", max_tokens=40)
    status, first = stream_thread(stack.urls[0], t["id"], limit=10)
    assert status == 200 and len(first) == 10
    so_far = thread(stack.urls[0], t["id"])["messages"][1]
    assert so_far["status"] == "running" and so_far["content"].startswith(text_of(first))
    token = {"token": t["stream_token"]}  # a reloaded page may hold only the thread's token
    status, rest = stream_thread(stack.urls[1], t["id"], after=first[-1].id, params=token,
                                 headers=None)
    assert status == 200
    reference = collect(stack.urls[1], gen["id"], headers=ACME)
    assert first + rest == reference and reference[-1].type == "done"
    body = idle(stack.urls[1], t["id"])
    assert body["messages"][1]["content"] == text_of(reference)
    assert len(body["messages"][1]["content"].split()) == 40
    for after in (None, reference[-1].id):
        assert stream_thread(stack.urls[1], t["id"], after=after)[0] == 204


def test_thread_token_reads_only_its_thread(stack: Stack) -> None:
    """A thread's token reads it and its stream, never another thread, and never posts or deletes;
    its tenant's GET hands out a fresh one (a reopened page), a token holder's GET none."""
    t = new_thread(stack.url)
    other = new_thread(stack.url)
    token = {"token": t["stream_token"]}
    base = f"{stack.url}/v1/threads"
    read = httpx.get(f"{base}/{t['id']}", params=token)
    assert read.status_code == 200
    assert read.json()["stream_token"] is None, "a token holder gets no fresh token"
    reopened = httpx.get(f"{base}/{t['id']}", headers=ACME).json()["stream_token"]
    assert httpx.get(f"{base}/{t['id']}", params={"token": reopened}).status_code == 200
    assert httpx.get(f"{base}/{other['id']}", params={"token": reopened}).status_code == 404
    assert httpx.get(f"{base}/{t['id']}/stream", params=token).status_code == 204
    assert httpx.get(f"{base}/{other['id']}", params=token).status_code == 404
    assert httpx.post(f"{base}/{t['id']}/messages", params=token,
                      json={"content": "x"}).status_code == 401
    assert httpx.delete(f"{base}/{t['id']}", params=token).status_code == 401
    assert httpx.get(f"{base}/{t['id']}", headers=GLOBEX).status_code == 404


def test_twenty_concurrent_posts_start_exactly_one(stack: Stack) -> None:
    """20 posts at once to an idle thread, over both API processes: one 202, nineteen 409."""
    t = new_thread(stack.url, model="fake:lorem")
    keys_before = _keys(stack)

    def send(i: int) -> httpx.Response:
        return post(stack.urls[i % 2], t["id"], f"message {i}", max_tokens=300)

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(send, range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] + [409] * 19
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {"thread_busy"}
    winner = next(r.json() for r in responses if r.status_code == 202)
    body = thread(stack.url, t["id"])
    assert body["active_generation_id"] == winner["id"]
    assert [m["generation_id"] for m in body["messages"]] == [winner["id"]] * 2
    new_generations = {k for k in _keys(stack) - keys_before if k.startswith("tr:{gen_")}
    assert {k.split("}")[0] for k in new_generations} == {"tr:{" + winner["id"]}
    cancel = httpx.post(f"{stack.url}/v1/generations/{winner['id']}/cancel", headers=ACME)
    assert cancel.status_code == 202
    idle(stack.url, t["id"])


def test_interrupt_cancels_the_running_answer_and_keeps_its_text(stack: Stack) -> None:
    """interrupt: the running answer ends cancelled with its partial text kept; the new one completes."""
    t = new_thread(stack.urls[0], model="fake:lorem")
    first = posted(stack.urls[0], t["id"], "long", max_tokens=300)
    _, seen = stream_thread(stack.urls[0], t["id"], limit=6)
    second = posted(stack.urls[1], t["id"], "quick one", model="fake:echo", if_busy="interrupt")
    first_events = collect(stack.urls[1], first["id"], headers=ACME)
    second_events = collect(stack.urls[0], second["id"], headers=ACME)
    assert first_events[-1].type == "cancelled"
    assert second_events[-1].type == "done" and text_of(second_events) == "quick one"
    assert _running_after(second_events, first_events[-1])
    body = idle(stack.urls[0], t["id"])
    answer = body["messages"][1]
    assert answer["status"] == "cancelled"
    assert answer["content"] == text_of(first_events) != ""
    assert text_of(seen) in answer["content"]
    assert conversation(body)[2:] == [("user", "quick one"), ("assistant", "quick one")]


def test_enqueue_runs_strictly_after_the_running_answer(stack: Stack) -> None:
    """enqueue: answered in order, its `running` after the first one's terminal event."""
    t = new_thread(stack.urls[0], model="fake:lorem")
    first = posted(stack.urls[0], t["id"], "first", max_tokens=20)
    second = posted(stack.urls[1], t["id"], "second in line", model="fake:echo",
                    if_busy="enqueue")
    assert second["status"] == "queued" and second["thread_id"] == t["id"]
    first_events = collect(stack.urls[1], first["id"], headers=ACME)
    second_events = collect(stack.urls[0], second["id"], headers=ACME)
    assert first_events[-1].type == "done" and second_events[-1].type == "done"
    assert _running_after(second_events, first_events[-1])
    body = idle(stack.urls[0], t["id"])
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"] * 2
    assert [m["generation_id"] for m in body["messages"]] == [first["id"]] * 2 + [second["id"]] * 2
    assert body["messages"][3]["content"] == "second in line"
    meta = httpx.get(f"{stack.url}/v1/generations/{second['id']}", headers=ACME).json()
    assert meta["metadata"] == {"thread_id": t["id"], "context_dropped_turns": "0"}


def _running_after(events: list[Event], terminal: Event) -> bool:
    running = next(e for e in events if e.type == "status" and e.data["status"] == "running")
    return parse_id(running.id) > parse_id(terminal.id)


def _keys(stack: Stack) -> set[str]:
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        return {k for pattern in ("tr:{thr_*", "tr:{gen_*", "tr:threads:*")
                for k in client.scan_iter(match=pattern)}
    finally:
        client.close()


UNKNOWN = "thr_" + "0" * 32


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status_code", "code"),
    [
        ("POST", f"/v1/threads/{UNKNOWN}/messages", {"json": {"content": "hi"}}, 404,
         "not_found"),
        ("POST", "/v1/threads/not-an-id/messages", {"json": {"content": "hi"}}, 404,
         "not_found"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": "hi"}, "headers": GLOBEX},
         404, "not_found"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": ""}}, 422,
         "validation_error"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": " \n "}}, 422,
         "validation_error"),
        ("POST", "/v1/threads/{id}/messages", {"json": {}}, 422, "validation_error"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": "x" * (MAX_CHARS + 1)}},
         422, "validation_error"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": "x" * MAX_BODY}}, 413,
         "payload_too_large"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": "hi", "if_busy": "wait"}},
         422, "validation_error"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": "hi", "model": "nope:x"}},
         400, "unknown_model"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": "hi", "max_tokens": 0}},
         422, "validation_error"),
        ("POST", "/v1/threads/{id}/messages", {"content": b"{not json"}, 400, "invalid_json"),
        ("POST", "/v1/threads/{id}/messages", {"json": {"content": "hi"}, "headers": {}}, 401,
         "unauthorized"),
        ("POST", "/v1/threads", {"json": {"model": "fake:nope"}}, 400, "unknown_model"),
        ("POST", "/v1/threads", {"json": {"colour": "red"}}, 422, "validation_error"),
        ("GET", f"/v1/threads/{UNKNOWN}", {}, 404, "not_found"),
        ("GET", f"/v1/threads/{UNKNOWN}/stream", {}, 404, "not_found"),
        ("GET", "/v1/threads/{id}/stream", {"headers": {**ACME, "Last-Event-ID": "x"}}, 400,
         "invalid_event_id"),
        ("GET", "/v1/threads/{id}", {"params": {"format": "pdf"}}, 422, "validation_error"),
        ("GET", "/v1/threads", {"params": {"cursor": "garbage"}}, 400, "invalid_request"),
        ("GET", "/v1/threads", {"params": {"limit": 0}}, 422, "validation_error"),
        ("DELETE", f"/v1/threads/{UNKNOWN}", {}, 404, "not_found"),
        ("DELETE", "/v1/threads/{id}", {"headers": GLOBEX}, 404, "not_found"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_creates_nothing(
    stack: Stack, method: str, path: str, kwargs: dict[str, Any], status_code: int, code: str
) -> None:
    """Each bad request gets its documented status and error body, and no Redis key appears or goes."""
    t = new_thread(stack.url)
    kwargs = {"headers": ACME, **kwargs}
    before = _keys(stack)
    response = httpx.request(method, f"{stack.url}{path.format(id=t['id'])}", timeout=10,
                             **kwargs)
    assert response.status_code == status_code, response.text
    assert response.json()["error"]["code"] == code
    assert _keys(stack) == before


def test_delete_leaves_no_key_of_the_thread(stack: Stack) -> None:
    """Delete cancels the running and the queued answer and leaves no key of the thread behind."""
    t = new_thread(stack.url, model="fake:lorem", system="sys")
    running = posted(stack.url, t["id"], "long", max_tokens=300)
    queued = posted(stack.url, t["id"], "next", if_busy="enqueue")
    stream_thread(stack.url, t["id"], limit=3)
    assert httpx.delete(f"{stack.urls[1]}/v1/threads/{t['id']}", headers=ACME).status_code == 204
    for gen in (running, queued):
        wait_for(lambda g=gen: httpx.get(f"{stack.url}/v1/generations/{g['id']}",
                                         headers=ACME).json()["status"] == "cancelled",
                 10, what="cancelled")
    client = redis.Redis.from_url(stack.redis_url)
    try:
        assert list(client.scan_iter(match=f"tr:{{{t['id']}}}*")) == []
        assert client.zscore("tr:threads:{acme}", t["id"]) is None
    finally:
        client.close()
    base = f"{stack.url}/v1/threads/{t['id']}"
    assert httpx.get(base, headers=ACME).status_code == 404
    assert post(stack.url, t["id"], "hello?").status_code == 404
    assert httpx.delete(base, headers=ACME).status_code == 404
    listed = httpx.get(f"{stack.url}/v1/threads", headers=ACME, params={"limit": 100}).json()
    assert t["id"] not in {item["id"] for item in listed["data"]}


def test_markdown_export_has_front_matter_and_every_message_in_order(stack: Stack) -> None:
    """?format=markdown: a YAML front matter (model, created_at, usage), then each message in order."""
    t = new_thread(stack.url, system="Answer in echoes.", model="fake:echo")
    for question in ("alpha beta", "gamma delta"):
        post_streaming(stack.url, t["id"], question)
    body = idle(stack.url, t["id"])
    response = httpx.get(f"{stack.url}/v1/threads/{t['id']}", headers=ACME,
                         params={"format": "markdown"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/markdown")
    text = response.text
    front, _, rest = text.removeprefix("---\n").partition("\n---\n")
    assert text.startswith("---\n") and rest
    assert 'model: "fake:echo"' in front and "created_at: " in front
    assert f"  total_tokens: {body['usage']['total_tokens']}" in front
    positions = [rest.index("Answer in echoes.")]
    for message in body["messages"]:
        heading = "## User" if message["role"] == "user" else "## Assistant"
        positions.append(rest.index(f"{heading}\n\n{message['content']}", positions[-1]))
    assert positions == sorted(positions) and len(body["messages"]) == 4


def test_listing_is_newest_activity_first_with_titles_and_a_cursor(stack: Stack) -> None:
    """GET /v1/threads: newest activity first, titled by the first message, paged by cursor."""
    ids = [new_thread(stack.url, headers=GLOBEX, model="fake:echo")["id"] for _ in range(3)]
    response = httpx.post(f"{stack.url}/v1/threads/{ids[0]}/messages", headers=GLOBEX,
                          json={"content": "  Hello   there, what is\nthe plan?  "})
    assert response.status_code == 202
    wait_for(lambda: thread(stack.url, ids[0], GLOBEX)["active_generation_id"] is None, 10)
    first = httpx.get(f"{stack.url}/v1/threads", headers=GLOBEX, params={"limit": 2}).json()
    assert [item["id"] for item in first["data"]] == [ids[0], ids[2]]
    assert first["data"][0]["title"] == "Hello there, what is the plan?"
    assert [item["message_count"] for item in first["data"]] == [2, 0]  # question and answer
    second = httpx.get(f"{stack.url}/v1/threads", headers=GLOBEX,
                       params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [item["id"] for item in second["data"]] == [ids[1]]
    assert second["next_cursor"] is None
