"""The ``/v1/ws`` protocol: client messages parsed and checked, server messages encoded.

Pure: no I/O. One JSON text message per WebSocket message, each an object with a
``type``; a client message may carry a ``ref`` (a string or an integer), which the
server echoes in its direct reply (``subscribed``, ``created``, ``error``, ...).

    client  subscribe    {generation_id | thread_id, after?}
            unsubscribe  {generation_id | thread_id}
            create       {request: generation body} | {thread_id, request: message body},
                         subscribe? (default true)
            cancel       {generation_id}
            auth         {api_key | token}
            ping         {}
    server  event        {generation_id, id, event, data}  (the SSE stream's events and ids)
            subscribed, unsubscribed, created, cancel_accepted, authenticated, pong,
            error {code, message, ref?}, ping

A bad message raises :class:`MessageError` (the codes of the HTTP API's errors), which
the socket sends back as an ``error`` message; nothing else happens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from tokenrelay.api.schemas import GenerationCreate
from tokenrelay.api.threads import MessageCreate
from tokenrelay.shared import events as ev
from tokenrelay.shared.errors import BadRequest, NotFound, TokenRelayError, ValidationFailed
from tokenrelay.shared.ids import is_generation_id
from tokenrelay.shared.threads import is_thread_id

Ref = str | int | None
MAX_REF_CHARS = 200


@dataclass(frozen=True, slots=True)
class Target:
    """What a subscription names: a generation, or a thread (its active answer)."""

    generation_id: str | None = None
    thread_id: str | None = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    target: Target
    after: ev.StreamId | None
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    target: Target
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Create:
    request: GenerationCreate | MessageCreate
    thread_id: str | None
    subscribe: bool
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Cancel:
    generation_id: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Auth:
    api_key: str | None
    token: str | None
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Ref = None


ClientMessage = Subscribe | Unsubscribe | Create | Cancel | Auth | Ping

# Each type's allowed keys besides "type" and "ref".
_KEYS = {
    "subscribe": {"generation_id", "thread_id", "after"},
    "unsubscribe": {"generation_id", "thread_id"},
    "create": {"request", "thread_id", "subscribe"},
    "cancel": {"generation_id"},
    "auth": {"api_key", "token"},
    "ping": set(),
}


class MessageError(Exception):
    """A bad client message: sent back as an ``error`` message with the message's ``ref``."""

    def __init__(self, code: str, message: str, ref: Ref = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


def parse(raw: str | bytes | None, max_bytes: int) -> ClientMessage:
    """One client message, checked; raises :class:`MessageError` saying what is wrong."""
    ref: Ref = None
    try:
        body = _load(raw, max_bytes)
        ref = _ref(body.get("ref"))
        return _message(body, ref)
    except TokenRelayError as exc:
        raise MessageError(exc.code, exc.message, ref) from None


def _load(raw: str | bytes | None, max_bytes: int) -> dict[str, Any]:
    if raw is None:
        raise BadRequest("send JSON text messages, not binary ones", code="invalid_message")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise BadRequest(f"message over {max_bytes} bytes", code="payload_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the message is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("a message is a JSON object with a \"type\"", code="invalid_message")
    if "\\u" in (raw if isinstance(raw, str) else raw.decode("utf-8", "replace")):
        _check_text(body)
    return body


def _message(body: dict[str, Any], ref: Ref) -> ClientMessage:
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise BadRequest(f"unknown message type {kind!r}; expected one of "
                         + ", ".join(sorted(_KEYS)), code="invalid_message")
    unknown = set(body) - _KEYS[kind] - {"type", "ref"}
    if unknown:
        raise BadRequest(f"{kind}: unknown field(s) " + ", ".join(sorted(unknown)),
                         code="invalid_message")
    if kind == "subscribe":
        return Subscribe(_target(body, kind), _after(body.get("after")), ref)
    if kind == "unsubscribe":
        return Unsubscribe(_target(body, kind), ref)
    if kind == "create":
        return _create(body, ref)
    if kind == "cancel":
        gen_id = _string(body, "generation_id", kind)
        if gen_id is None:
            raise BadRequest("cancel: generation_id is required", code="invalid_message")
        return Cancel(_generation(gen_id), ref)
    if kind == "auth":
        api_key, token = _string(body, "api_key", kind), _string(body, "token", kind)
        if (api_key is None) == (token is None):
            raise BadRequest("auth: give exactly one of api_key or token",
                             code="invalid_message")
        return Auth(api_key, token, ref)
    return Ping(ref)


def _ref(value: object) -> Ref:
    if value is None or isinstance(value, str) and len(value) <= MAX_REF_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return value
    raise BadRequest(f"ref: a string of at most {MAX_REF_CHARS} characters or an integer",
                     code="invalid_message")


def _string(body: dict[str, Any], name: str, kind: str) -> str | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise BadRequest(f"{kind}: {name} must be a non-empty string", code="invalid_message")
    return value


def _generation(gen_id: str) -> str:
    if not is_generation_id(gen_id):
        raise NotFound("no such generation")
    return gen_id


def _thread(thread_id: str) -> str:
    if not is_thread_id(thread_id):
        raise NotFound("no such thread")
    return thread_id


def _target(body: dict[str, Any], kind: str) -> Target:
    gen_id, thread_id = _string(body, "generation_id", kind), _string(body, "thread_id", kind)
    if (gen_id is None) == (thread_id is None):
        raise BadRequest(f"{kind}: give exactly one of generation_id or thread_id",
                         code="invalid_message")
    if gen_id is not None:
        return Target(generation_id=_generation(gen_id))
    assert thread_id is not None
    return Target(thread_id=_thread(thread_id))


def _after(value: object) -> ev.StreamId | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest("after: an event id (<milliseconds>-<sequence>)",
                         code="invalid_event_id")
    try:
        return ev.parse_id(value.strip())
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid_event_id") from None


def _create(body: dict[str, Any], ref: Ref) -> Create:
    thread_id = _string(body, "thread_id", "create")
    subscribe = body.get("subscribe", True)
    if not isinstance(subscribe, bool):
        raise BadRequest("create: subscribe must be true or false", code="invalid_message")
    request = body.get("request")
    if not isinstance(request, dict):
        raise BadRequest("create: request must be an object (the body of POST "
                         "/v1/generations, or of a thread message with thread_id)",
                         code="invalid_message")
    model: type[BaseModel] = GenerationCreate if thread_id is None else MessageCreate
    try:
        checked = model.model_validate(request)
    except ValidationError as exc:
        raise ValidationFailed("create: " + describe(exc)) from None
    assert isinstance(checked, GenerationCreate | MessageCreate)
    return Create(checked, None if thread_id is None else _thread(thread_id), subscribe, ref)


def describe(exc: ValidationError) -> str:
    """The first few problems of a failed validation, one ``field: problem`` each."""
    return "; ".join(f"request.{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}"
                     for err in exc.errors()[:5])


def _check_text(body: dict[str, Any]) -> None:
    """A lone UTF-16 surrogate (``"\\ud800"``) parses but is not text: refused here, as the
    HTTP API refuses it, rather than when written to Redis."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValidationFailed("the message holds a lone UTF-16 surrogate escape "
                               "(\\ud800-\\udfff not in a pair), which is not text",
                               code="invalid_text") from None


# --- server messages -------------------------------------------------------------------


def event_message(gen_id: str, event: ev.Event) -> str:
    """The ``event`` message of one stream event: its stored JSON written as is (the ids
    and the types are plain ASCII tokens, so they need no escaping)."""
    return (f'{{"type":"event","generation_id":"{gen_id}","id":"{event.id}",'
            f'"event":"{event.type}","data":{event.data_json}}}')


def reply(kind: str, ref: Ref = None, **fields: Any) -> str:
    """A direct reply (``subscribed``, ``created``, ...), with the request's ``ref``."""
    body: dict[str, Any] = {"type": kind, **fields}
    if ref is not None:
        body["ref"] = ref
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def error(code: str, message: str, ref: Ref = None, **fields: Any) -> str:
    return reply("error", ref, code=code, message=message, **fields)


PING = '{"type":"ping"}'
# The close of every socket when the process shuts down (SIGTERM): reconnect elsewhere,
# and resume with ``after``.
DRAIN = (1012, "server restarting; reconnect")


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (RFC 6455 §5.2) of ``payload`` (UTF-8): what a server
    writes for one message when no extension (compression) is in use."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 1 << 16:
        head = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return head + payload
