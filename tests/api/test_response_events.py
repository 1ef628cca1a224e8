"""The Responses fold (api.response_events): the event sequence the openai SDK's stream
helper accepts, numbered 0, 1, 2… the same way by every fold of the same stream, and a
resume after any sequence number that hands out exactly the events after it."""

from __future__ import annotations

import json
from typing import Any

from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from tests.api.test_channel import Hub, drain, entry
from tests.fake_upstream import REASONING, TOOL_CALLS, interleaved_tool_call_deltas
from tokenrelay.api.channel import Channel, Entry, Viewer
from tokenrelay.api.response_events import RESPONSES, ResponseState, after_sequence, fold, step
from tokenrelay.shared import events as ev

HEAD = {"id": "resp_" + "ab" * 16, "object": "response", "created_at": 1, "model": "fake:echo",
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


def stream(*body: tuple[str, dict[str, Any]]) -> list[Entry]:
    """A response's entries: queued (with its head), running, ``body``."""
    return [entry(0, ev.STATUS, status="queued", response=HEAD),
            entry(1, ev.STATUS, status="running")] + [
        entry(i + 2, kind, **data) for i, (kind, data) in enumerate(body)]


def text(*words: str, finish: str = "stop") -> list[Entry]:
    return stream(*[(ev.DELTA, {"content": w}) for w in words],
                  (ev.DONE, {"finish_reason": finish, "usage": {
                      "prompt_tokens": 2, "completion_tokens": len(words), "total_tokens": 5}}))


def frames_of(entries: list[Entry]) -> bytes:
    state = ResponseState()
    return b"".join(step(state, ev.decode_entry(*e)) for e in entries)


def parse(frames: bytes) -> list[dict[str, Any]]:
    """The events as the SDK's SSE decoder sees them: `event:` names and JSON data."""
    out = []
    for block in frames.split(b"\n\n"):
        if block:
            name, data = block.decode().split("\n")
            out.append(json.loads(data.removeprefix("data: ")))
            assert name == f"event: {out[-1]['type']}"
    return out


def sdk(events: list[dict[str, Any]]) -> ResponseStreamState[Any]:
    """Feed the events to the openai SDK's own stream helper state, which raises on a
    sequence it does not accept."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[], text_format=omit)
    for data in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=data))
    return state


def test_a_text_answer_is_the_sequence_the_sdk_parses_numbered_from_zero() -> None:
    """created, in_progress, item and part added, deltas, the …done events, completed."""
    events = parse(frames_of(text("Hel", "lo", " you")))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * 3,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = sdk(events)._completed_response
    assert final is not None and final.output_text == "Hello you"
    assert final.id == HEAD["id"] and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 3
    assert all(e["logprobs"] == [] for e in events if e["type"].startswith("response.output_t"))


def test_reasoning_and_interleaved_tool_calls_become_items_each_done_before_the_end() -> None:
    """Reasoning text, then two function calls whose fragments interleave (as parallel
    calls stream): every item added gets its …done, and the final output holds them all."""
    body = [(ev.DELTA, {"reasoning": piece}) for piece in REASONING]
    body += [(ev.DELTA, {"tool_calls": group}) for group in interleaved_tool_call_deltas()]
    events = parse(frames_of(stream(*body, (ev.DONE, {"finish_reason": "tool_calls"}))))
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == ["reasoning", "function_call", "function_call"]
    assert sorted(done) == [0, 1, 2]
    final = sdk(events)._completed_response
    assert final is not None
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        (t["id"], t["name"], t["arguments"]) for t in TOOL_CALLS]
    reasoning = final.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "".join(REASONING)


def test_endings_other_than_completed() -> None:
    """length → incomplete (max_output_tokens), cancelled → failed with status cancelled,
    error → failed with the error; open items end incomplete first."""
    incomplete = parse(frames_of(text("a", "b", finish="length")))[-1]
    assert incomplete["type"] == "response.incomplete"
    assert incomplete["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    for terminal, data, status in [(ev.CANCELLED, {}, "cancelled"),
                                   (ev.ERROR, {"code": "upstream_error", "message": "no"},
                                    "failed")]:
        events = parse(frames_of(stream((ev.DELTA, {"content": "a"}), (terminal, data))))
        assert events[-2]["type"] == "response.output_item.done"
        assert events[-2]["item"]["status"] == "incomplete"
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["status"] == status
        assert (events[-1]["response"]["error"] is None) == (status == "cancelled")


def test_a_restart_after_output_closes_the_lost_attempts_item_and_opens_a_new_one() -> None:
    """The text a lost worker sent stays sent, in an item that ends incomplete and leaves the
    output; the final response holds the new attempt's text only."""
    entries = stream((ev.DELTA, {"content": "lost "}), (ev.STATUS, {"status": "restarted"}),
                     (ev.STATUS, {"status": "running"}), (ev.DELTA, {"content": "kept"}),
                     (ev.DONE, {"finish_reason": "stop"}))
    events = parse(frames_of(entries))
    final = sdk(events)._completed_response
    assert final is not None and final.output_text == "kept"
    lost = [e for e in events if e["type"] == "response.output_item.done"][0]
    assert lost["item"]["status"] == "incomplete" and lost["output_index"] == 0
    assert fold([ev.decode_entry(*e) for e in entries]).output_text == "kept"


def test_a_resume_after_any_sequence_number_gets_exactly_the_events_after_it() -> None:
    """after_sequence over the frames, whatever chunk they arrive in, skips 0..k only."""
    frames = frames_of(text(*[f" w{i}" for i in range(12)]))
    everything = parse(frames)
    blocks = [b + b"\n\n" for b in frames.split(b"\n\n") if b]
    for k in range(-1, len(everything)):
        for cut in (1, 5, len(blocks)):
            chunks = [b"".join(blocks[i : i + cut]) for i in range(0, len(blocks), cut)]
            got, last = b"", k
            for chunk in chunks:
                out = after_sequence(chunk, last) if last is not None else chunk
                if out:
                    last = None
                got += out
            assert parse(got) == everything[k + 1 :]


def test_a_delta_quoting_the_field_name_does_not_confuse_the_resume() -> None:
    """Text that spells `"sequence_number":99` is escaped in the JSON, after the real field."""
    frames = frames_of(text('"sequence_number":99', " x"))
    assert parse(after_sequence(frames, 4)) == parse(frames)[5:]


async def test_viewers_of_a_trimmed_channel_get_the_frames_of_a_fold_from_the_start() -> None:
    """The fold primes from Redis when the channel holds only a tail: same bytes."""
    stored = text(*[f" w{i}" for i in range(40)])
    channel = Channel("gen", 8)
    channel.append(stored)
    assert not channel.head_complete
    got = await drain(Viewer(Hub(channel, stored, page=7), "gen", None, RESPONSES, channel))
    assert b"".join(got) == frames_of(stored)


def test_a_generation_not_made_as_a_response_has_no_frames() -> None:
    """A first event without the response's fields (a native generation): nothing to say."""
    plain = [entry(0, ev.STATUS, status="queued"), entry(1), entry(2, ev.DONE)]
    assert frames_of(plain) == b""
