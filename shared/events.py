"""The event model: the single definition of the wire format.

A generation's events are entries of a Redis Stream with two fields, ``t`` (the
event type) and ``d`` (its JSON data). The SSE frame of an entry is
``id: <entry id>\\nevent: <t>\\ndata: <d>\\n\\n``; the stored JSON is written to
the wire as is, so the API never re-serialises an event.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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

RETRY_FRAME = b"retry: 1000\n\n"

_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MAX_U64 = 2**64 - 1

StreamId = tuple[int, int]


def parse_id(raw: str) -> StreamId:
    """Parse a Redis Stream entry id ``ms-seq``; raise ValueError if malformed."""
    match = _ID_RE.match(raw)
    if match is None:
        raise ValueError(f"malformed event id {raw!r}: expected <milliseconds>-<sequence>")
    ms, seq = int(match[1]), int(match[2])
    if ms > _MAX_U64 or seq > _MAX_U64:
        raise ValueError(f"malformed event id {raw!r}: out of range")
    return ms, seq


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def dumps(data: dict[str, Any]) -> str:
    """Compact JSON, as stored in the stream and written on the wire."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a generation's stream."""

    id: str
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


def entry_fields(event_type: str, data: dict[str, Any]) -> dict[str, str]:
    """The Redis Stream fields for an event (what XADD stores)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return {"t": event_type, "d": dumps(data)}


def decode_entry(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    """Turn an XRANGE/XREAD entry into an Event."""
    norm = {text(k): text(v) for k, v in fields.items()}
    return Event(text(entry_id), norm["t"], json.loads(norm["d"]))


def encode_sse(entry_id: str, event_type: str, data_json: str) -> bytes:
    """The SSE frame of one event. ``data_json`` is the stored JSON (one line)."""
    return f"id: {entry_id}\nevent: {event_type}\ndata: {data_json}\n\n".encode()


def encode_event(event: Event) -> bytes:
    return encode_sse(event.id, event.type, dumps(event.data))


def frame_of_entry(entry_id: bytes | str, fields: dict[Any, Any]) -> tuple[str, str, bytes]:
    """(id, type, SSE frame) of a raw stream entry, without parsing its JSON."""
    eid = text(entry_id)
    etype = text(fields[b"t"] if b"t" in fields else fields["t"])
    data = text(fields[b"d"] if b"d" in fields else fields["d"])
    return eid, etype, encode_sse(eid, etype, data)


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
