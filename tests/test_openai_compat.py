"""POST /v1/chat/completions and GET /v1/models, driven by clients we did not write.

The official openai SDK (sync and async, stream and non-stream, with_raw_response)
and httpx-sse, against real API and worker processes on a private redis-server.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from tests.client import collect, create, status, text_of
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.slow  # starts real processes


KEY = "sk-acme"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """One API process and one worker, auth on (one tenant), a fast fake provider."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_API_KEYS": f"acme:{KEY}",
                                      "TOKENRELAY_FAKE_TPS": "200"})
    yield s
    s.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_sdk_stream_concatenates_to_the_status_content(stack: Stack, client: openai.OpenAI) -> None:
    """Streamed content from the SDK equals the generation's status content; usage comes last."""
    stream = client.chat.completions.create(
        model="fake:lorem", messages=user("hi"), max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    gen_id = chunks[0].id
    final = status(stack.url, gen_id, AUTH)
    assert final["status"] == "completed"
    assert text == final["content"] and len(text.split()) == 40
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == final["usage"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["length"]


async def test_async_sdk_stream_concatenates_to_the_status_content(
    stack: Stack, aclient: openai.AsyncOpenAI
) -> None:
    """The async SDK's streamed content equals the status content too."""
    async with aclient:
        stream = await aclient.chat.completions.create(
            model="fake:echo", messages=user(PROMPT), stream=True)
        text, gen_id = "", None
        async for chunk in stream:
            gen_id = chunk.id
            text += chunk.choices[0].delta.content or ""
    assert gen_id is not None
    assert text == status(stack.url, gen_id, AUTH)["content"] == PROMPT


def test_sdk_non_stream_returns_a_completion_with_usage(
    stack: Stack, client: openai.OpenAI
) -> None:
    """Non-stream answers one ChatCompletion whose text and usage are the generation's."""
    completion = client.chat.completions.create(model="fake:echo", messages=user(PROMPT))
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    final = status(stack.url, completion.id, AUTH)
    assert completion.choices[0].message.content == final["content"] == PROMPT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    words = len(PROMPT.split())
    assert completion.usage.model_dump(exclude_none=True) == final["usage"] == {
        "prompt_tokens": words, "completion_tokens": words, "total_tokens": 2 * words}


async def test_raw_response_carries_the_generation_id(
    stack: Stack, aclient: openai.AsyncOpenAI
) -> None:
    """with_raw_response shows X-Generation-Id (and a stream token), stream or not."""
    async with aclient, httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        raw = await aclient.chat.completions.with_raw_response.create(
            model="fake:echo", messages=user("one two"))
        completion = raw.parse()
        assert raw.headers["X-Generation-Id"] == completion.id
        # X-Stream-Token reads that generation, without the API key (a share link).
        shared = await http.get(f"/v1/generations/{completion.id}",
                                params={"token": raw.headers["X-Stream-Token"]})
        assert shared.status_code == 200 and shared.json()["content"] == "one two"

        raw_stream = await aclient.chat.completions.with_raw_response.create(
            model="fake:echo", messages=user("three four"), stream=True)
        gen_id = raw_stream.headers["X-Generation-Id"]
        text = "".join([c.choices[0].delta.content or "" async for c in raw_stream.parse()])
    assert gen_id.startswith("gen_") and text == status(stack.url, gen_id, AUTH)["content"]


def test_bad_request_raises_bad_request_error_with_our_message(
    stack: Stack, client: openai.OpenAI
) -> None:
    """A bad request is openai.BadRequestError, with our message and the parameter named."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake:echo", messages=user("x"), max_tokens=0)
    assert info.value.param == "max_tokens" and info.value.type == "invalid_request_error"
    assert "max_tokens" in info.value.message and "greater than or equal to 1" in info.value.message

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake:echo", messages=user("x"),
                                       logit_bias={"50256": -100})
    assert info.value.code == "unsupported_parameter" and info.value.param == "logit_bias"
    assert "tokenrelay does not support the 'logit_bias' parameter" in info.value.message
    # Counted like any error answer.
    metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
    assert 'tokenrelay_http_errors_total{code="unsupported_parameter"}' in metrics


def test_unknown_model_raises_not_found_error(client: openai.OpenAI) -> None:
    """An unknown model is openai.NotFoundError (model_not_found), as with OpenAI itself."""
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="fake:nope", messages=user("x"))
    assert info.value.code == "model_not_found"
    assert "unknown fake model 'nope'" in info.value.message


def test_bad_key_raises_authentication_error(stack: Stack) -> None:
    """A wrong API key is openai.AuthenticationError, in OpenAI's error shape."""
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model="fake:echo", messages=user("x"))
    assert info.value.type == "authentication_error" and info.value.code == "unauthorized"


def test_unknown_id_through_the_native_api_is_404_in_the_native_shape(stack: Stack) -> None:
    """An unknown generation id is a 404 on the native API, whose errors keep their own shape."""
    unknown = "gen_" + uuid.uuid4().hex
    for path in (f"/v1/generations/{unknown}", f"/v1/generations/{unknown}/events"):
        response = httpx.get(stack.url + path, headers=AUTH, timeout=10)
        assert response.status_code == 404
        assert response.json() == {"error": {"code": "not_found", "message": "no such generation"}}


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    """GET /v1/models lists the configured models; an unknown one is openai.NotFoundError."""
    listed = [m.id for m in client.models.list()]
    assert listed == ["fake:echo", "fake:lorem", "fake:error"]
    assert client.models.retrieve("fake:lorem").id == "fake:lorem"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope:nothing")


def test_failed_generation_raises_server_error_stream_or_not(
    stack: Stack, client: openai.OpenAI
) -> None:
    """fake:error: non-stream is a 502 InternalServerError, stream raises APIError mid-way."""
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.with_raw_response.create(model="fake:error", messages=user("x"))
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    assert "failed on purpose" in info.value.message
    gen_id = info.value.response.headers["X-Generation-Id"]
    assert status(stack.url, gen_id, AUTH)["status"] == "failed"

    text = ""
    with pytest.raises(openai.APIError) as streamed:
        for chunk in client.chat.completions.create(
            model="fake:error", messages=user("x"), stream=True
        ):
            text += chunk.choices[0].delta.content or ""
    assert streamed.value.code == "upstream_error" and text == "lorem ipsum dolor"


def test_cancel_mid_stream_ends_the_sdk_stream_with_an_error(
    stack: Stack, client: openai.OpenAI
) -> None:
    """A native cancel of a streaming chat completion ends its SDK stream with APIError."""
    stream = client.chat.completions.create(
        model="fake:lorem", messages=user("x"), max_tokens=5000, stream=True)
    cancelled = False
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if not cancelled and chunk.choices and chunk.choices[0].delta.content:
                response = httpx.post(f"{stack.url}/v1/generations/{chunk.id}/cancel",
                                      headers=AUTH, timeout=10)
                assert response.status_code == 202
                cancelled = True
    assert info.value.code == "cancelled"
    assert status(stack.url, chunk.id, AUTH)["status"] == "cancelled"


def test_chunk_ids_let_a_client_resume_through_the_native_events(stack: Stack) -> None:
    """httpx-sse reads some chunks, drops; Last-Event-ID on the native stream gives the rest."""
    body = {"model": "fake:lorem", "messages": user("x"), "max_tokens": 60, "stream": True}
    text, last_id = "", None
    with httpx.Client(timeout=10) as http, connect_sse(
        # A copy: connect_sse writes its Accept header into the dict it is given.
        http, "POST", f"{stack.url}/v1/chat/completions", json=body, headers=dict(AUTH)
    ) as source:
        gen_id = source.response.headers["X-Generation-Id"]
        for sse in source.iter_sse():
            chunk = json.loads(sse.data)
            text += chunk["choices"][0]["delta"].get("content") or ""
            last_id = sse.id
            if len(text.split()) >= 5:
                break  # the client drops; back within ABANDON_GRACE_S, it goes on
    assert last_id is not None
    rest = collect(stack.url, gen_id, after=last_id, headers=AUTH)
    assert rest[-1].type == "done"
    assert text + text_of(rest) == status(stack.url, gen_id, AUTH)["content"]
    assert len((text + text_of(rest)).split()) == 60


def test_idempotency_key_returns_the_same_generation(client: openai.OpenAI) -> None:
    """The same Idempotency-Key from the same tenant answers with the same generation."""
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.chat.completions.create(
        model="fake:echo", messages=user("same"), extra_headers=key)
    again = client.chat.completions.create(
        model="fake:echo", messages=user("same"), extra_headers=key)
    assert first.id == again.id and again.choices[0].message.content == "same"


@pytest.mark.parametrize(("body", "status_code"), [
    (b"[]", 400),
    (b'"text"', 400),
    (b'{"model": 1, "messages": "x"}', 400),
    (b'{"model": "fake:echo", "messages": [{"role": "user", "content": 5}]}', 400),
    (b'{"model": "fake:echo", "messages": [{"content": "x"}]}', 400),
    (b'{"model": "fake:echo", "messages": [{"role": "user", "content": "x"}], '
     b'"stream_options": "yes", "stream": true}', 400),
    (b'{"model": "fake:echo", "messages": [{"role": "user", "content": "x"}], '
     b'"max_tokens": 99999999}', 400),
    (b"x" * 1_100_000, 413),
])
def test_garbage_is_a_4xx_in_openai_shape(stack: Stack, body: bytes, status_code: int) -> None:
    """Whatever a client sends is a 4xx in OpenAI's error shape, never a 500 nor a generation."""
    before = httpx.get(f"{stack.url}/v1/usage", headers=AUTH, timeout=10).json()
    response = httpx.post(f"{stack.url}/v1/chat/completions", content=body,
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == status_code, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "X-Generation-Id" not in response.headers
    assert httpx.get(f"{stack.url}/v1/usage", headers=AUTH, timeout=10).json() == before


def test_wrong_method_is_405_in_openai_shape(stack: Stack) -> None:
    """The framework's own errors on these paths are in OpenAI's shape too."""
    response = httpx.get(f"{stack.url}/v1/chat/completions", headers=AUTH, timeout=10)
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_heartbeats_do_not_break_the_sdk() -> None:
    """Heartbeats sent while the first token is awaited do not break the SDK's parsing."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_HEARTBEAT_S": "0.05",
                                      "TOKENRELAY_FAKE_TTFT_MS": "600"})
    try:
        body = {"model": "fake:echo", "messages": user("a b c"), "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=10) as raw:
            payload = b"".join(raw.iter_bytes())
        assert b": ping\n" in payload and payload.endswith(b"data: [DONE]\n\n")

        with openai.OpenAI(base_url=f"{s.url}/v1", api_key="any", max_retries=0) as c:
            chunks = list(c.chat.completions.create(
                model="fake:echo", messages=user("a b c"), stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "a b c"
    finally:
        s.stop()


def test_created_generation_is_visible_to_the_native_api(stack: Stack) -> None:
    """A chat completion is an ordinary generation: its native events say the same as its chunks."""
    created = create(stack.url, AUTH, model="fake:echo", prompt="native first")
    wait_for(lambda: status(stack.url, created["id"], AUTH)["status"] == "completed",
             what="native generation completed")
    response = httpx.post(f"{stack.url}/v1/chat/completions", headers=AUTH, timeout=10, json={
        "model": "fake:echo", "messages": user("then openai")})
    gen_id = response.headers["X-Generation-Id"]
    events = collect(stack.url, gen_id, headers=AUTH)
    assert text_of(events) == response.json()["choices"][0]["message"]["content"] == "then openai"
    assert events[0].data == {"status": "queued"} and events[-1].type == "done"
