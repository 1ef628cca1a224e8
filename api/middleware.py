"""ASGI middleware: request bodies over the limit, and a request id on every answer and log line."""

from __future__ import annotations

import json
import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay.api.errors import ErrorShapes, Failure
from tokenrelay.api.metrics import Metrics
from tokenrelay.shared.logs import request_id


class BodyLimit:
    """Answers 413 for bodies over the limit, whether Content-Length says so or the bytes
    do, and 422 for JSON text that no UTF-8 can carry (a lone surrogate, ``\\ud800``).

    The body is read here first, up to the limit, and replayed to the app: the app
    never sees a partial body. Python's JSON parser accepts an escaped lone surrogate,
    and such a string would fail only later, when written to Redis or sent on.
    """

    def __init__(self, app: ASGIApp, limit: int, errors: ErrorShapes):
        self.app = app
        self.limit = limit
        self.errors = errors  # the error shape of the request's path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send, Failure(
                413, "payload_too_large", f"request body over {self.limit} bytes"))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._reject(scope, receive, send, Failure(
                    413, "payload_too_large", f"request body over {self.limit} bytes"))
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _holds_lone_surrogate(body):
            await self._reject(scope, receive, send, Failure(
                422, "invalid_text", "the body holds a lone UTF-16 surrogate escape "
                "(\\ud800-\\udfff not in a pair), which is not text"))
            return
        replayed = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay([replayed], receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, failure: Failure) -> None:
        response = self.errors.response(scope["path"], failure)
        await response(scope, receive, send)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _holds_lone_surrogate(body: bytes) -> bool:
    """Whether JSON ``body`` escapes a surrogate that does not pair up (a pair decodes to
    one character and is fine). Bodies without such an escape are not parsed here."""
    if _SURROGATE_ESCAPE.search(body) is None:
        return False
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    except ValueError:  # not JSON: the route says so in its own words
        return False
    return False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class RequestContext:
    """Sets the request id (the client's ``X-Request-Id`` or a new one) for logs and the
    response header, and counts responses by status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if 0 < len(given) <= 64 and given.isprintable() else secrets.token_hex(8)
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode("latin-1"))]
                self.metrics.responses.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
