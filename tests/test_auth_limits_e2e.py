"""Tenants, stream tokens and limits, end to end: every refusal is a clear 4xx/503 that changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.client import collect, create, status
from tests.stack import Stack
from tokenrelay.api.tokens import StreamTokens

pytestmark = pytest.mark.slow  # starts real processes


SECRET = "test-signing-secret"
ACME = {"Authorization": "Bearer k-acme"}
GLOBEX = {"Authorization": "Bearer k-globex"}


@pytest.fixture(scope="module")
def auth_stack() -> Iterator[Stack]:
    s = Stack(apis=1, workers=1, env={
        "TOKENRELAY_API_KEYS": "acme:k-acme,globex:k-globex",
        "TOKENRELAY_SIGNING_SECRET": SECRET,
        "TOKENRELAY_MAX_BODY_BYTES": "2000",
        "TOKENRELAY_MAX_TOKENS_LIMIT": "500",
    })
    yield s
    s.stop()


def test_no_or_bad_key_is_401(auth_stack: Stack) -> None:
    """Without a key, or with an unknown one, every API call is a 401 with the error body."""
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k-acme"}):
        response = httpx.post(f"{auth_stack.url}/v1/generations", headers=headers,
                              json={"model": "fake:echo", "prompt": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


def test_other_tenant_gets_404_for_everything(auth_stack: Stack) -> None:
    """Another tenant's status, events and cancel all answer 404, as for an unknown id."""
    gen = create(auth_stack.url, headers=ACME, model="fake:lorem", prompt="x", max_tokens=400)
    base = f"{auth_stack.url}/v1/generations/{gen['id']}"
    assert httpx.get(base, headers=GLOBEX).status_code == 404
    assert httpx.get(f"{base}/events", headers=GLOBEX).status_code == 404
    assert httpx.post(f"{base}/cancel", headers=GLOBEX).status_code == 404
    assert status(auth_stack.url, gen["id"], headers=ACME)["status"] in ("queued", "running")
    assert httpx.post(f"{base}/cancel", headers=ACME).status_code == 202


def test_stream_token_reads_but_cannot_cancel(auth_stack: Stack) -> None:
    """A valid stream token reads status and events of its generation only, and cannot cancel."""
    gen = create(auth_stack.url, headers=ACME, model="fake:echo", prompt="shared view")
    other = create(auth_stack.url, headers=ACME, model="fake:echo", prompt="other")
    token = {"token": gen["stream_token"]}
    events = collect(auth_stack.url, gen["id"], params=token)
    assert events[-1].type == "done"
    body = httpx.get(f"{auth_stack.url}/v1/generations/{gen['id']}", params=token).json()
    assert body["content"] == "shared view"
    wrong = httpx.get(f"{auth_stack.url}/v1/generations/{other['id']}", params=token)
    assert wrong.status_code == 404
    cancel = httpx.post(f"{auth_stack.url}/v1/generations/{gen['id']}/cancel", params=token)
    assert cancel.status_code == 401


def test_tampered_or_expired_token_is_401(auth_stack: Stack) -> None:
    """A token with a changed signature, id or expiry, or past its expiry, is a 401."""
    gen = create(auth_stack.url, headers=ACME, model="fake:echo", prompt="x")
    gen_id, expires, sig = gen["stream_token"].split(".")
    forged_expiry = f"{gen_id}.{int(expires) + 1000}.{sig}"
    flipped = f"{gen_id}.{expires}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    expired = StreamTokens(SECRET.encode(), 60).issue(gen_id, now=time.time() - 3600)
    for token in (forged_expiry, flipped, expired, "garbage"):
        for path in ("", "/events"):
            response = httpx.get(f"{auth_stack.url}/v1/generations/{gen_id}{path}",
                                 params={"token": token})
            assert response.status_code == 401, (token, path)
    valid = StreamTokens(SECRET.encode(), 60).issue(gen_id)
    assert httpx.get(f"{auth_stack.url}/v1/generations/{gen_id}",
                     params={"token": valid}).status_code == 200


def test_generation_ids_carry_128_random_bits(auth_stack: Stack) -> None:
    """Ids are gen_ + the creation time (12 hex digits) + 32 random hex digits (128 bits),
    and differ every time."""
    ids = {create(auth_stack.url, headers=ACME, model="fake:echo", prompt="x")["id"]
           for _ in range(5)}
    assert len(ids) == 5
    assert all(len(i) == 48 and int(i[4:], 16) >= 0 for i in ids)
    assert len({i[16:] for i in ids}) == 5  # the random parts


def test_body_over_the_limit_is_413(auth_stack: Stack) -> None:
    """A body over MAX_BODY_BYTES is a 413, whether declared by Content-Length or chunked."""
    big = {"model": "fake:echo", "prompt": "x" * 5000}
    response = httpx.post(f"{auth_stack.url}/v1/generations", headers=ACME, json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "fake:echo", "prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    chunked = httpx.post(f"{auth_stack.url}/v1/generations", content=chunks(),
                         headers={**ACME, "content-type": "application/json"})
    assert chunked.status_code == 413


@pytest.mark.parametrize("body", [
    {"model": "fake:echo", "prompt": "x", "max_tokens": 501},
    {"model": "fake:echo", "prompt": "x", "max_tokens": 0},
    {"model": "fake:echo", "messages": []},
    {"model": "fake:echo", "messages": [{"role": "robot", "content": "x"}]},
    {"model": "fake:echo", "prompt": "x", "messages": [{"role": "user", "content": "x"}]},
    {"model": "fake:echo", "prompt": "x", "temperature": 9},
])
def test_message_and_max_tokens_bounds_are_422(auth_stack: Stack, body: dict) -> None:
    """Schema violations (max_tokens over the limit, empty or bad messages) are 422."""
    response = httpx.post(f"{auth_stack.url}/v1/generations", headers=ACME, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"


def test_idempotency_key_returns_the_same_generation_under_concurrent_retries(
    auth_stack: Stack,
) -> None:
    """Ten concurrent creates with one Idempotency-Key make one generation; another tenant's key is its own."""
    headers = {**ACME, "Idempotency-Key": "retry-me-42"}
    body = {"model": "fake:echo", "prompt": "once"}

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{auth_stack.url}/v1/generations", headers=headers, json=body)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(post, range(10)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    theirs = httpx.post(f"{auth_stack.url}/v1/generations",
                        headers={**GLOBEX, "Idempotency-Key": "retry-me-42"}, json=body)
    assert theirs.json()["id"] != responses[0].json()["id"]


def test_per_tenant_concurrency_is_429_with_retry_after() -> None:
    """Past MAX_CONCURRENT_PER_TENANT active generations a tenant gets 429 + Retry-After; others don't."""
    s = Stack(apis=1, workers=0, in_process=True, env={"TOKENRELAY_API_KEYS": "acme:k-acme,globex:k-globex",
                                      "TOKENRELAY_MAX_CONCURRENT_PER_TENANT": "2"})
    try:
        first = [create(s.url, headers=ACME, model="fake:echo", prompt="x") for _ in range(2)]
        over = httpx.post(f"{s.url}/v1/generations", headers=ACME,
                          json={"model": "fake:echo", "prompt": "x"})
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "rate_limited"
        assert int(over.headers["retry-after"]) > 0
        create(s.url, headers=GLOBEX, model="fake:echo", prompt="x")  # another tenant: fine
        # Ending one frees a slot.
        httpx.post(f"{s.url}/v1/generations/{first[0]['id']}/cancel", headers=ACME)
        create(s.url, headers=ACME, model="fake:echo", prompt="x")
    finally:
        s.stop()


def test_queue_depth_is_503_with_retry_after() -> None:
    """Past MAX_QUEUE_DEPTH queued jobs, creates answer 503 + Retry-After and create nothing."""
    s = Stack(apis=1, workers=0, in_process=True, env={"TOKENRELAY_MAX_QUEUE_DEPTH": "3"})
    try:
        for _ in range(3):
            create(s.url, model="fake:echo", prompt="x")
        over = httpx.post(f"{s.url}/v1/generations", json={"model": "fake:echo", "prompt": "x"})
        assert over.status_code == 503
        assert over.json()["error"]["code"] == "overloaded"
        assert int(over.headers["retry-after"]) > 0
    finally:
        s.stop()


def test_max_generation_s_ends_with_a_timeout_error() -> None:
    """A generation longer than MAX_GENERATION_S ends with one `error` event, code `timeout`."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_MAX_GENERATION_S": "0.5",
                                      "TOKENRELAY_FAKE_TPS": "20"})
    try:
        gen = create(s.url, model="fake:lorem", prompt="x", max_tokens=200)
        events = collect(s.url, gen["id"])
        assert events[-1].type == "error" and events[-1].data["code"] == "timeout"
        assert [e.terminal for e in events].count(True) == 1
        assert status(s.url, gen["id"])["status"] == "failed"
    finally:
        s.stop()


def test_viewers_per_process_limit_is_503() -> None:
    """Past MAX_VIEWERS_PER_PROCESS open streams, a new viewer gets 503 + Retry-After."""
    s = Stack(apis=1, workers=0, in_process=True, env={"TOKENRELAY_MAX_VIEWERS_PER_PROCESS": "2"})
    try:
        gen = create(s.url, model="fake:echo", prompt="x")
        url = f"{s.url}/v1/generations/{gen['id']}/events"
        with httpx.Client(timeout=10) as client:
            with client.stream("GET", url) as one, client.stream("GET", url) as two:
                assert one.status_code == two.status_code == 200
                # Keep the iterators referenced: a collected one closes its response.
                streams = [one.iter_bytes(), two.iter_bytes()]
                assert all(next(it).startswith(b"retry:") for it in streams)
                third = client.get(url)
                assert third.status_code == 503
                assert int(third.headers["retry-after"]) > 0
    finally:
        s.stop()
