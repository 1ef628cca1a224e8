"""The /v1/ws message protocol (api.ws_protocol): parsing, checks, and the server's messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from tokenrelay.api import ws_protocol as proto
from tokenrelay.api.schemas import GenerationCreate
from tokenrelay.api.threads import MessageCreate
from tokenrelay.shared import events as ev

GEN = "gen_0123456789abcdef0123456789abcdef"
MAX = 10_000


def parse(message: object) -> proto.ClientMessage:
    return proto.parse(message if isinstance(message, str) else json.dumps(message), MAX)


def test_each_message_type_parses_to_its_dataclass() -> None:
    """Every client message type, with its optional fields, parses into what the session runs."""
    assert parse({"type": "subscribe", "generation_id": GEN, "after": "17-2", "ref": "a"}) == \
        proto.Subscribe(proto.Target(generation_id=GEN), (17, 2), "a")
    assert parse({"type": "subscribe", "generation_id": GEN, "after": ""}) == \
        proto.Subscribe(proto.Target(generation_id=GEN), None)
    thread = parse({"type": "unsubscribe", "thread_id": "thr_" + "a" * 32})
    assert isinstance(thread, proto.Unsubscribe) and thread.target.thread_id == "thr_" + "a" * 32
    created = parse({"type": "create", "request": {"prompt": "hi", "max_tokens": 3}, "ref": 9})
    assert isinstance(created, proto.Create) and created.subscribe and created.ref == 9
    assert isinstance(created.request, GenerationCreate) and created.request.max_tokens == 3
    message = parse({"type": "create", "thread_id": "thr_" + "b" * 32, "subscribe": False,
                     "request": {"content": "hello", "if_busy": "enqueue"}})
    assert isinstance(message, proto.Create) and isinstance(message.request, MessageCreate)
    assert not message.subscribe
    assert parse({"type": "cancel", "generation_id": GEN}) == proto.Cancel(GEN)
    assert parse({"type": "auth", "token": "t"}) == proto.Auth(None, "t")
    assert parse({"type": "auth", "api_key": "k"}) == proto.Auth("k", None)
    assert parse({"type": "ping"}) == proto.Ping()


@pytest.mark.parametrize(("message", "code"), [
    ("{", "invalid_json"),
    ("nan", "invalid_json"),
    ("[" * 100_000, "payload_too_large"),
    ('"text"', "invalid_message"),
    ({"no": "type"}, "invalid_message"),
    ({"type": "SUBSCRIBE", "generation_id": GEN}, "invalid_message"),
    ({"type": "subscribe", "generation_id": GEN, "extra": 1}, "invalid_message"),
    ({"type": "subscribe", "generation_id": "gen_short"}, "not_found"),
    ({"type": "subscribe", "thread_id": "gen_" + "a" * 32}, "not_found"),
    ({"type": "subscribe", "generation_id": GEN, "after": 5}, "invalid_event_id"),
    ({"type": "subscribe", "generation_id": GEN, "after": "1-2-3"}, "invalid_event_id"),
    ({"type": "subscribe", "generation_id": ""}, "invalid_message"),
    ({"type": "unsubscribe"}, "invalid_message"),
    ({"type": "create", "request": "prompt"}, "invalid_message"),
    ({"type": "create", "request": {"prompt": "x", "messages": []}}, "validation_error"),
    ({"type": "create", "request": {"prompt": "x", "temperature": 9}}, "validation_error"),
    ({"type": "create", "thread_id": "thr_" + "a" * 32, "request": {"prompt": "x"}},
     "validation_error"),
    ({"type": "create", "request": {"prompt": "\ud800"}}, "invalid_text"),
    ({"type": "cancel"}, "invalid_message"),
    ({"type": "cancel", "generation_id": "x"}, "not_found"),
    ({"type": "auth", "api_key": "k", "token": "t"}, "invalid_message"),
    ({"type": "auth", "api_key": 5}, "invalid_message"),
    ({"type": "ping", "ref": True}, "invalid_message"),
    ({"type": "ping", "ref": "r" * 201}, "invalid_message"),
    ({"type": "ping", "ref": 2**60}, "invalid_message"),
])
def test_bad_messages_raise_with_their_code(message: object, code: str) -> None:
    """Each malformed message raises MessageError with the HTTP API's code for the problem."""
    raw = message if isinstance(message, str) else json.dumps(message)
    with pytest.raises(proto.MessageError) as caught:
        proto.parse(raw, MAX)
    assert caught.value.code == code
    assert caught.value.message


def test_binary_messages_are_refused() -> None:
    """A binary message (no text) is refused: the protocol is JSON text."""
    with pytest.raises(proto.MessageError) as caught:
        proto.parse(None, MAX)
    assert caught.value.code == "invalid_message"


def test_an_error_carries_the_ref_of_its_message() -> None:
    """A message that fails after its ref was read has that ref, for the error reply."""
    with pytest.raises(proto.MessageError) as caught:
        parse({"type": "cancel", "generation_id": "nope", "ref": "r1"})
    assert (caught.value.code, caught.value.ref) == ("not_found", "r1")
    assert json.loads(proto.error(caught.value.code, caught.value.message, caught.value.ref)) \
        == {"type": "error", "code": "not_found", "message": "no such generation", "ref": "r1"}


@given(st.text(max_size=40), st.sampled_from(sorted(ev.EVENT_TYPES)),
       st.integers(0, 2**40), st.integers(0, 99))
def test_event_message_is_json_with_the_stored_data(content: str, etype: str, ms: int,
                                                    seq: int) -> None:
    """The event message written from the stored JSON parses back to the event's fields."""
    event = ev.decode_entry(f"{ms}-{seq}", ev.entry_fields(etype, {"content": content}))
    assert json.loads(proto.event_message(GEN, event)) == {
        "type": "event", "generation_id": GEN, "id": f"{ms}-{seq}", "event": etype,
        "data": {"content": content}}


def test_replies_echo_the_ref_only_when_given() -> None:
    assert json.loads(proto.reply("pong")) == {"type": "pong"}
    assert json.loads(proto.reply("subscribed", 0, generation_id=GEN)) == \
        {"type": "subscribed", "generation_id": GEN, "ref": 0}


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_text_frame_parses_as_one_final_unmasked_text_frame(size: int) -> None:
    """The websockets library reads a pre-made frame back as the message it carries, at
    each length encoding (7, 16 and 64 bits)."""
    payload = ("é" * size).encode()[:size]
    reader = StreamReader()
    reader.feed_data(proto.text_frame(payload))
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as parsed:
        next(parser)
    frame = parsed.value.value
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)
