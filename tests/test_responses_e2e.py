"""POST /v1/responses, GET /v1/responses/{id} and …/cancel, driven by the official openai SDK
(sync and async) against two API processes and two workers on a private redis-server; the
``openai:`` models answer from the local OpenAI-compatible test server, which records
what it was sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.client import create, stored_generations
from tests.fake_upstream import TOOL_CALLS, Record
from tests.stack import Stack

pytestmark = pytest.mark.slow  # starts real processes

KEY, OTHER_KEY = "sk-acme", "sk-other"
WORDS = " ".join(f"word{i}" for i in range(60))


@pytest.fixture(scope="module")
def stack(upstream: tuple[str, Record]) -> Iterator[Stack]:
    """Two API processes, two workers, two tenants; fake models at 150 words/s."""
    s = Stack(apis=2, workers=2, env={
        "TOKENRELAY_API_KEYS": f"acme:{KEY},other:{OTHER_KEY}",
        "TOKENRELAY_FAKE_TPS": "150",
        "TOKENRELAY_OPENAI_BASE_URL": upstream[0],
        "TOKENRELAY_OPENAI_API_KEY": "test",
    })
    yield s
    s.stop()


def client(stack: Stack, api: int = 0, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.urls[api]}/v1", api_key=key, max_retries=0)


def dumped(events: Any) -> list[dict[str, Any]]:
    return [event.model_dump(exclude_unset=True) for event in events]


def deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_a_background_stream_dropped_after_k_events_resumes_on_the_other_process(
        stack: Stack) -> None:
    """Read k events from api0, drop the connection, resume with starting_after on api1: the
    events after k come exactly once, in order, to response.completed, and the whole
    stream's text is the retrieved response's output_text."""
    k = 7
    with client(stack, 0) as first, client(stack, 1) as second:
        stream = first.responses.create(model="fake:echo", input=WORDS, background=True,
                                        stream=True)
        head = []
        for event in stream:
            head.append(event.model_dump(exclude_unset=True))
            if len(head) == k:
                break
        stream.close()  # dropped mid-answer
        resp_id = head[0]["response"]["id"]
        assert head[-1]["type"] == "response.output_text.delta"  # really mid-answer
        rest = dumped(second.responses.retrieve(resp_id, stream=True,
                                                starting_after=head[-1]["sequence_number"]))
        assert [e["sequence_number"] for e in head + rest] == list(range(len(head + rest)))
        assert rest[-1]["type"] == "response.completed"
        retrieved = second.responses.retrieve(resp_id)
        assert retrieved.status == "completed" and retrieved.background is True
        assert deltas(head + rest) == retrieved.output_text == WORDS
        # A replay from the start, on either process, is the same events, byte for byte.
        assert dumped(first.responses.retrieve(resp_id, stream=True)) == head + rest


def test_a_stream_whose_api_process_stops_ends_quietly_and_resumes_elsewhere(
        stack: Stack) -> None:
    """SIGTERM the API process serving a stream: the SDK's iteration ends without an error
    (no event it cannot parse), and the rest comes from another process, exactly once."""
    leaving = stack.add_api()
    url = stack.urls[-1]
    stack.wait_ready(url)
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as doomed, \
            client(stack, 0) as survivor:
        head = []
        for event in doomed.responses.create(model="fake:lorem", input="x", stream=True,
                                             max_output_tokens=300):
            head.append(event.model_dump(exclude_unset=True))
            if len(head) == 5:
                leaving.stop()  # SIGTERM: the API ends its streams, then exits
        assert head[-1]["type"] != "response.incomplete"  # it ended before the response
        rest = dumped(survivor.responses.retrieve(head[0]["response"]["id"], stream=True,
                                                  starting_after=head[-1]["sequence_number"]))
        assert [e["sequence_number"] for e in head + rest] == list(range(len(head + rest)))
        assert rest[-1]["type"] == "response.incomplete"  # max_output_tokens reached


async def test_non_stream_and_stream_creates_give_the_same_text(stack: Stack) -> None:
    """The async SDK: a plain create, a streamed create and the stream helper (on the other
    process) agree with each other and with the deterministic fake:echo."""
    prompt = "the quick brown fox jumps over the lazy dog"
    async with openai.AsyncOpenAI(base_url=f"{stack.urls[0]}/v1", api_key=KEY,
                                  max_retries=0) as first, openai.AsyncOpenAI(
            base_url=f"{stack.urls[1]}/v1", api_key=KEY, max_retries=0) as second:
        plain = await first.responses.create(model="fake:echo", input=prompt,
                                             instructions="repeat", temperature=0.5)
        assert plain.status == "completed" and plain.instructions == "repeat"
        assert plain.usage is not None and plain.usage.output_tokens == 9
        streamed = [e.model_dump() async for e in await first.responses.create(
            model="fake:echo", input=[{"role": "user", "content": [
                {"type": "input_text", "text": prompt}]}], stream=True)]
        async with second.responses.stream(model="fake:echo", input=prompt) as helper:
            final = await helper.get_final_response()
        assert plain.output_text == deltas(streamed) == final.output_text == prompt
        assert (await second.responses.retrieve(plain.id)).output_text == prompt


def test_cancel_ends_a_response_cancelled_and_is_idempotent(stack: Stack) -> None:
    """Cancel a background response mid-answer on the other process (no chaining onto it
    before): it comes back cancelled, its stream ends with response.failed (status
    cancelled), a second cancel answers the same."""
    with client(stack, 0) as first, client(stack, 1) as second:
        started = first.responses.create(model="fake:lorem", input="go", background=True,
                                         max_output_tokens=5000)
        assert started.status in ("queued", "in_progress")  # a worker may have started
        stream = first.responses.retrieve(started.id, stream=True)
        for event in stream:
            if event.type == "response.output_text.delta":
                break  # it is running
        with pytest.raises(openai.BadRequestError) as early:  # chain onto it: not yet
            second.responses.create(model="fake:echo", input="x",
                                    previous_response_id=started.id)
        assert early.value.code == "previous_response_in_progress"
        cancelled = second.responses.cancel(started.id)
        assert cancelled.status == "cancelled"
        rest = [event.type for event in stream]
        assert rest[-1] == "response.failed"
        assert "response.completed" not in rest
        assert second.responses.cancel(started.id).model_dump() == cancelled.model_dump()
        assert first.responses.retrieve(started.id).status == "cancelled"


def test_previous_response_id_sends_the_earlier_turns_upstream(
        stack: Stack, upstream: tuple[str, Record]) -> None:
    """Turn two carries turn one's input and answer (not its instructions); a tool round
    trip carries the calls and their outputs."""
    record = upstream[1]
    with client(stack, 0) as first, client(stack, 1) as second:
        one = first.responses.create(model="openai:model-a", input="first question",
                                     instructions="old rules")
        two = second.responses.create(model="openai:model-a", input="second question",
                                      instructions="new rules", previous_response_id=one.id)
        assert two.output_text == "second question" and two.previous_response_id == one.id
        assert record.requests[-1]["messages"] == [
            {"role": "system", "content": "new rules"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first question"},
            {"role": "user", "content": "second question"}]
        tools = [{"type": "function", "name": call["name"], "parameters": {"type": "object"}}
                 for call in TOOL_CALLS]
        asked = first.responses.create(model="openai:tools", input="weather?", tools=tools)
        calls = [item for item in asked.output if item.type == "function_call"]
        assert [c.name for c in calls] == [c["name"] for c in TOOL_CALLS]
        assert record.requests[-1]["tools"][0]["function"]["name"] == TOOL_CALLS[0]["name"]
        second.responses.create(model="openai:model-a", previous_response_id=asked.id, input=[
            {"type": "function_call_output", "call_id": c.call_id, "output": "sunny"}
            for c in calls])
        sent = record.requests[-1]["messages"]
        assert sent[0] == {"role": "user", "content": "weather?"}
        assert [tc["id"] for tc in sent[1]["tool_calls"]] == [c["id"] for c in TOOL_CALLS]
        assert sent[2:] == [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"}
                            for c in TOOL_CALLS]


def test_bad_input_gets_openai_errors_and_creates_nothing(stack: Stack) -> None:
    """Unknown or malformed ids 404, invalid parameters and an unknown previous_response_id
    400, all in OpenAI's shape, never a 5xx, and no generation stored."""
    url = f"{stack.urls[1]}/v1/responses"
    auth = {"Authorization": f"Bearer {KEY}"}
    native = create(stack.urls[0], headers=auth, model="fake:echo", prompt="x")["id"]
    with client(stack, 0) as sdk, client(stack, 0, OTHER_KEY) as other:
        mine = sdk.responses.create(model="fake:echo", input="mine")
        before = stored_generations(stack.redis_url)
        for resp_id in ("resp_" + "0" * 32, "nope", native.replace("gen_", "resp_")):
            with pytest.raises(openai.NotFoundError):
                sdk.responses.retrieve(resp_id)
            with pytest.raises(openai.NotFoundError):
                sdk.responses.cancel(resp_id)
            with pytest.raises(openai.NotFoundError):
                list(sdk.responses.retrieve(resp_id, stream=True))
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(mine.id)  # another tenant's
        with pytest.raises(openai.BadRequestError) as chained:
            other.responses.create(model="fake:echo", input="x", previous_response_id=mine.id)
        assert chained.value.code == "previous_response_not_found"
    bad_bodies: list[Any] = [
        {"model": "fake:echo", "input": "x", "temperature": 5},
        {"model": "fake:echo", "input": "x", "frobnicate": True},
        {"model": "fake:echo", "input": ""},
        {"model": "fake:echo"},
        {"model": "fake:echo", "input": [{"type": "item_reference", "id": "x"}]},
        {"model": "fake:echo", "input": [{"role": "robot", "content": "x"}]},
        {"model": "fake:echo", "input": [{"role": ["user"], "content": "x"}]},
        {"model": "fake:echo", "input": [{"role": "user", "content": [{"type": "input_file"}]}]},
        {"model": "fake:echo", "input": "x", "tools": [{"type": "web_search"}]},
        {"model": "fake:echo", "input": "x", "tool_choice": {"type": "mcp"}},
        {"model": "fake:echo", "input": "x", "max_output_tokens": 0},
        {"model": "fake:echo", "input": "x", "text": {"format": {"type": "json_schema"}}},
        {"model": "fake:echo", "input": "x", "previous_response_id": "resp_nope"},
        {"model": "fake:echo", "input": "x", "parallel_tool_calls": False},
        ["not", "an", "object"],
    ]
    for body in bad_bodies:
        answer = httpx.post(url, json=body, headers=auth)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    unknown_model = httpx.post(url, json={"model": "fake:nope", "input": "x"}, headers=auth)
    assert unknown_model.status_code == 404
    assert unknown_model.json()["error"]["code"] == "model_not_found"
    assert httpx.post(url, content=b"{", headers=auth).status_code == 400
    assert httpx.get(f"{url}/{mine.id}", params={"stream": "true", "starting_after": "x"},
                     headers=auth).status_code == 400
    assert stored_generations(stack.redis_url) == before
