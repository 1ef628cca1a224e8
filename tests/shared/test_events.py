"""The event model: encoding and decoding round-trip, id parsing is strict."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenrelay.shared import events as ev

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
stream_ids = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))


@given(
    sid=stream_ids,
    etype=st.sampled_from(sorted(ev.EVENT_TYPES)),
    data=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)
def test_entry_to_sse_and_back_round_trips(sid: ev.StreamId, etype: str, data: dict) -> None:
    """Any event stored as stream fields and written as an SSE frame parses back unchanged."""
    eid = ev.format_id(sid)
    fields = ev.entry_fields(etype, data)
    decoded = ev.decode_entry(eid.encode(), {k.encode(): v.encode() for k, v in fields.items()})
    assert decoded == ev.Event(eid, etype, data)
    flat = [part.encode() for pair in fields.items() for part in pair]  # a raw reply's form
    assert ev.decode_entry(eid.encode(), flat) == decoded
    frame = ev.encode_event(decoded)
    assert frame == ev.encode_event(ev.Event(eid, etype, data))  # stored JSON = compact dumps
    assert ev.parse_sse(frame.decode()) == [decoded]


@pytest.mark.parametrize("fields", [
    [b"d", b'{"n":1}', b"t", b"delta"],  # another order
    [b"t", b"delta", b"x", b"1", b"d", b'{"n":1}'],  # another field
    ["t", "delta", "d", '{"n":1}'],  # text
])
def test_a_flat_entry_in_another_form_decodes_as_its_dict(fields: list[bytes | str]) -> None:
    """Flat fields the fast path does not take (order, extra fields, text) decode all the same."""
    assert ev.decode_entry(b"1-0", fields) == ev.Event("1-0", "delta", {"n": 1})


@pytest.mark.parametrize("fields", [[b"t", b"delta", b"d"], [b"t", b"delta"]])
def test_a_flat_entry_without_its_fields_raises(fields: list[bytes]) -> None:
    """A flat entry with a name but no value, or no data, is malformed: ValueError or KeyError
    (the hub fails that stream's channel on either)."""
    with pytest.raises((ValueError, KeyError)):
        ev.decode_entry(b"1-0", fields)


def test_sse_frame_writes_the_stored_json_as_is() -> None:
    """A decoded event's frame carries the stored JSON byte for byte, never a re-encoding."""
    stored = '{"content": "spaced",  "n": 1.50}'
    decoded = ev.decode_entry("5-1", {"t": "delta", "d": stored})
    assert decoded.data == {"content": "spaced", "n": 1.5}
    assert ev.encode_event(decoded) == f"id: 5-1\nevent: delta\ndata: {stored}\n\n".encode()


@given(stream_ids)
def test_id_parse_inverts_format(sid: ev.StreamId) -> None:
    """format_id and parse_id are inverse for every valid stream id."""
    assert ev.parse_id(ev.format_id(sid)) == sid


@given(st.text(max_size=30))
def test_parse_id_accepts_only_the_ms_seq_form(raw: str) -> None:
    """parse_id accepts exactly <digits>-<digits> within 64 bits, and raises ValueError otherwise."""
    try:
        ms, seq = ev.parse_id(raw)
    except ValueError:
        left, sep, right = raw.partition("-")
        valid = (sep and left.isascii() and left.isdigit() and right.isascii()
                 and right.isdigit() and len(left) <= 20 and len(right) <= 20
                 and int(left) < 2**64 and int(right) < 2**64)
        assert not valid
    else:
        assert raw == f"{ms}-{seq}" or raw.lstrip("0") != raw  # leading zeros normalise


@pytest.mark.parametrize("raw", ["", "1", "1-", "-1", "a-1", "1-2-3", " 1-2", "18446744073709551616-0"])
def test_malformed_ids_raise(raw: str) -> None:
    """Malformed or out-of-range ids raise ValueError."""
    with pytest.raises(ValueError):
        ev.parse_id(raw)


def test_data_with_newlines_stays_on_one_data_line() -> None:
    """JSON escapes newlines, so a delta with line breaks is one `data:` line on the wire."""
    frame = ev.encode_sse("1-0", "delta", ev.dumps({"content": "a\nb\r\nc"}))
    assert frame.count(b"\ndata: ") == 1
    assert ev.parse_sse(frame.decode())[0].data == {"content": "a\nb\r\nc"}


def test_unknown_event_type_is_refused() -> None:
    """Only the documented event types can be written."""
    with pytest.raises(ValueError):
        ev.entry_fields("bogus", {})
