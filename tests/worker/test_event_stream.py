"""EventData: an event stream's bytes, read in pieces of any size, into the data of its events."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenrelay.worker.providers.event_stream import EventData

# One stream with every case the format has: comments, the other fields, multi-line data,
# a field with no colon, no space or two spaces after the colon, an event with no data
# line, data that is empty, and an event the stream ends in the middle of.
STREAM = (
    b": keep-alive\n"
    b"data: {\"a\": 1}\n"
    b"\n"
    b"event: error\n"
    b"id: 7\n"
    b"retry: 1000\n"
    b"data: {\"error\":\n"
    b"data:  {\"message\": \"no\"}}\n"
    b"\n"
    b"event: ping\n"
    b"id: 8\n"
    b"\n"
    b"data\n"
    b"\n"
    b"data:x:y\n"
    b"dataless: z\n"
    b"\n"
    b"data: [DONE]\n"
    b"\n"
    b"data: cut off by the end"
)
EVENTS = [b'{"a": 1}', b'{"error":\n {"message": "no"}}', b"", b"x:y", b"[DONE]"]


def read(pieces: list[bytes]) -> list[bytes]:
    events = EventData()
    return [data for piece in pieces for data in events.feed(piece)]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_split_of_the_stream_gives_the_same_events(newline: bytes) -> None:
    """Split in two at every byte boundary, with LF, CRLF or CR line ends (a CRLF split
    between its CR and its LF included), the stream gives the same events, in order."""
    stream = STREAM.replace(b"\n", newline)
    assert read([stream]) == EVENTS
    for at in range(len(stream) + 1):
        assert read([stream[:at], stream[at:]]) == EVENTS, at


def test_byte_by_byte_gives_the_same_events() -> None:
    """One byte per read (CRLF line ends) gives the same events as one read of everything."""
    stream = STREAM.replace(b"\n", b"\r\n")
    assert read([stream[i:i + 1] for i in range(len(stream))]) == EVENTS


def test_an_event_is_given_at_its_blank_line_not_before() -> None:
    """The data of an event comes out with the read that ends it, not earlier or later."""
    events = EventData()
    assert events.feed(b"data: a\n") == []
    assert events.feed(b"data: b\n") == []
    assert events.feed(b"\ndata: c\n\n") == [b"a\nb", b"c"]


def test_a_cr_then_lf_then_lf_across_reads_is_one_line_end_and_a_blank_line() -> None:
    """CR at the end of one read and LF at the start of the next are one line end; a second
    LF after them is the blank line that ends the event."""
    events = EventData()
    assert events.feed(b"data: a\r") == []
    assert events.feed(b"\n") == []
    assert events.feed(b"\n") == [b"a"]


def test_a_cr_then_lf_only_swallows_the_lf_that_directly_follows() -> None:
    """After a read that ends with CR, an empty read changes nothing and a read that does
    not open with LF is read whole."""
    events = EventData()
    assert events.feed(b"data: a\r") == []
    assert events.feed(b"") == []
    assert events.feed(b"\n\r") == [b"a"]
    assert events.feed(b"data: b\r\r") == [b"b"]


@given(
    st.lists(st.lists(st.binary().filter(lambda b: b"\r" not in b and b"\n" not in b),
                      min_size=1, max_size=3), max_size=5),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_any_events_split_anywhere_come_out_as_sent(
    events: list[list[bytes]], newline: bytes, cuts: list[int]
) -> None:
    """Any events (data of any bytes but line ends, over several lines), with any line end,
    cut at any points, come out as sent."""
    stream = b"".join(
        b"".join(b"data: " + line + newline for line in lines) + newline for lines in events)
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert read(pieces) == [b"\n".join(lines) for lines in events]
