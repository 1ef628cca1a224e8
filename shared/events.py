"""The event model: the single definition of the wire format.

A generation's events are entries of a Redis Stream with two fields, ``t`` (the
event type) and ``d`` (its JSON data). An :class:`Event` decoded from an entry
keeps that JSON text, and its SSE frame ``id: <entry id>\\nevent: <t>\\ndata: <d>\\n\\n``
writes it as is, so the API never re-serialises (nor, for SSE, parses) an event.
"""

from __future__ import annotations

import json
from typing import Any

from tokenrelay.shared.redis import text

STATUS = "status"
DELTA = "delta"
DONE = "done"
CANCELLED = "cancelled"
ERROR = "error"

# Generation statuses (GET /v1/generations/{id}).
QUEUED = "queued"
RUNNING = "running"
RESTARTED = "restarted"
COMPLETED = "completed"
FAILED = "failed"

# The one definition of how a generation ends: each terminal event type and the
# status it leaves the generation in. The sets below, and the Lua scripts that
# check for an ended generation (``shared.streams``), are derived from it.
STATUS_AFTER = {DONE: COMPLETED, CANCELLED: CANCELLED, ERROR: FAILED}
TERMINAL_TYPES = frozenset(STATUS_AFTER)
TERMINAL_STATUSES = frozenset(STATUS_AFTER.values())
EVENT_TYPES = frozenset({STATUS, DELTA}) | TERMINAL_TYPES

# The reconnection time, written first with no blank line after it: it joins the first
# event's block. A block of ``retry:`` alone dispatches nothing in the SSE spec, but
# httpx-sse and fetch-event-source yield it as an event with empty data.
RETRY_FRAME = b"retry: 1000\n"

_MAX_U64 = 2**64 - 1

StreamId = tuple[int, int]


def parse_id(raw: str) -> StreamId:
    """Parse a Redis Stream entry id ``ms-seq``; raise ValueError if malformed.

    Runs once per event the hub reads, so string methods rather than a regular
    expression: ``isascii`` first, as ``isdigit`` alone accepts other scripts' digits.
    """
    ms, _, seq = raw.partition("-")
    if raw.isascii() and ms.isdigit() and seq.isdigit() and len(ms) <= 20 and len(seq) <= 20:
        sid = int(ms), int(seq)
        if sid[0] <= _MAX_U64 and sid[1] <= _MAX_U64:
            return sid
        raise ValueError(f"malformed event id {raw!r}: out of range")
    raise ValueError(f"malformed event id {raw!r}: expected <milliseconds>-<sequence>")


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


# One encoder for every event: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(data: dict[str, Any]) -> str:
    """Compact JSON, as stored in the stream and written on the wire."""
    return _ENCODER.encode(data)


class Event:
    """One event of a generation's stream: ``id``, ``type`` and its ``data``.

    An event decoded from a stream entry keeps the stored JSON (``data_json``),
    which encoders write as is, and parses it into ``data`` when that is first
    read: a process that only relays SSE never parses an event. The API shares
    one Event among all its consumers: treat it, and its data, as read-only.
    """

    __slots__ = ("id", "type", "_data", "_json")

    def __init__(self, id: str, type: str, data: dict[str, Any] | None = None,
                 data_json: str = ""):
        if data is None and not data_json:
            raise ValueError("an event needs its data or its stored JSON")
        self.id = id
        self.type = type
        self._data = data
        self._json = data_json

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = json.loads(self._json)
        return self._data

    @property
    def data_json(self) -> str:
        """The data as stored in the stream (compact JSON when the event was built by hand)."""
        if not self._json:
            self._json = dumps(self.data)
        return self._json

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.id, self.type, self.data) == (other.id, other.type, other.data)

    __hash__ = None  # type: ignore[assignment]  # equal by its (mutable) data

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, type={self.type!r}, data={self.data!r})"


def entry_fields(event_type: str, data: dict[str, Any]) -> dict[str, str]:
    """The Redis Stream fields for an event (what XADD stores)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return {"t": event_type, "d": dumps(data)}


# The known types by value, as text and as a reply's bytes, so that every decoded event
# shares one string per type (and a type read as bytes needs no decoding).
_TYPES: dict[bytes | str, str] = {t: t for t in EVENT_TYPES} | {t.encode(): t for t in EVENT_TYPES}


def decode_entry(entry_id: bytes | str, fields: dict[Any, Any] | list[Any]) -> Event:
    """Turn an XRANGE/XREAD entry into an Event. ``fields`` is a dict (redis-py's parsed
    reply, bytes or str) or, from a raw reply (the hub's reads), the flat list
    ``[name, value, ...]``, where the writer's ``t, type, d, data`` in bytes is taken as
    it stands: once per event read, so no dict, and positional arguments (a keyword one
    costs Event() a dict)."""
    if isinstance(fields, list):
        if len(fields) == 4 and fields[0] == b"t" and fields[2] == b"d":
            raw_type = fields[1]
            return Event(text(entry_id), _TYPES.get(raw_type) or raw_type.decode(), None,
                         fields[3].decode())
        # another order, other fields, or text: as a dict
        return decode_entry(entry_id, dict(zip(fields[::2], fields[1::2], strict=True)))
    raw_type = fields.get(b"t")
    if raw_type is None:
        raw_type = fields["t"]
    raw_data = fields.get(b"d")
    if raw_data is None:
        raw_data = fields["d"]
    return Event(text(entry_id), _TYPES.get(raw_type) or text(raw_type), None, text(raw_data))


def encode_sse(entry_id: str, event_type: str, data_json: str) -> bytes:
    """The SSE frame of one event. ``data_json`` is the stored JSON (one line)."""
    return f"id: {entry_id}\nevent: {event_type}\ndata: {data_json}\n\n".encode()


def encode_event(event: Event) -> bytes:
    """The SSE frame of ``event``, with its stored JSON when it has one."""
    return encode_sse(event.id, event.type, event.data_json)


def parse_sse(payload: str) -> list[Event]:
    """Parse SSE text back into events (comments and retry lines ignored): for tests and tools."""
    out: list[Event] = []
    for block in payload.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "event" in fields and "data" in fields:
            out.append(Event(fields.get("id", ""), fields["event"], json.loads(fields["data"])))
    return out
