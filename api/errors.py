"""Every failure rendered once, in the error shape of the protocol its path belongs to.

    exception ──handler (by type)──▶ Failure ──ErrorShapes.for_path──▶ JSON body + headers
    native paths    {"error": {"code", "message"}}
    OpenAI paths    {"error": {"message", "type", "param", "code"}}   (api.openai_errors)

Handlers raise domain errors (``shared.errors``); nothing builds a failure body
elsewhere, and no body is re-read to change its shape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenrelay.shared.errors import TokenRelayError

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


@dataclass(frozen=True, slots=True)
class Failure:
    """What went wrong, before any protocol's shape: status, code, message, and extras."""

    status: int
    code: str
    message: str
    retry_after: int | None = None
    param: str | None = None  # the offending request parameter, where a protocol names it
    type: str | None = None  # a protocol's own error class, where it has one
    headers: Mapping[str, str] | None = None

    @classmethod
    def of(cls, exc: TokenRelayError) -> Failure:
        return cls(exc.status, exc.code, exc.message, exc.retry_after)


# A protocol's error body for a failure, and the status to send it with.
ErrorShape = Callable[[Failure], tuple[int, dict[str, Any]]]


def native_shape(failure: Failure) -> tuple[int, dict[str, Any]]:
    return failure.status, {"error": {"code": failure.code, "message": failure.message}}


class ErrorShapes:
    """Which error shape answers on which path: a protocol's own under its prefixes,
    the native one everywhere else."""

    def __init__(self) -> None:
        self._by_prefix: list[tuple[str, ErrorShape]] = []

    def add(self, prefixes: tuple[str, ...], shape: ErrorShape) -> None:
        self._by_prefix += [(prefix, shape) for prefix in prefixes]

    def for_path(self, path: str) -> ErrorShape:
        for prefix, shape in self._by_prefix:
            if path == prefix or path.startswith(prefix + "/"):
                return shape
        return native_shape

    def response(self, path: str, failure: Failure) -> JSONResponse:
        status, body = self.for_path(path)(failure)
        headers = dict(failure.headers or {})
        if failure.retry_after is not None:
            headers["Retry-After"] = str(failure.retry_after)
        return JSONResponse(body, status_code=status, headers=headers or None)

    def reply(self, request: Request, failure: Failure) -> JSONResponse:
        """The response of an exception handler: counted by code, shaped by path."""
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.errors.labels(failure.code).inc()
        return self.response(request.url.path, failure)


def _describe(errors: list[dict[str, object]]) -> str:
    parts = []
    for err in errors[:5]:
        path: tuple[object, ...] = tuple(err.get("loc", ()))  # type: ignore[arg-type]
        loc = ".".join(str(p) for p in path if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts)


def _validation_failure(exc: RequestValidationError) -> Failure:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return Failure(400, "invalid_json", "request body is not valid JSON")
    if isinstance(exc.body, bytes | str):  # a body sent without a JSON content type
        try:
            json.loads(exc.body)
        except ValueError:
            return Failure(400, "invalid_json", "request body is not valid JSON")
        return Failure(415, "unsupported_media_type",
                       "send the body with Content-Type: application/json")
    return Failure(422, "validation_error", _describe(errors))


def add_exception_handlers(app: FastAPI) -> ErrorShapes:
    """Map every exception to a Failure, rendered in the shape of the request's path.

    Returns the shapes, for protocols to add theirs (``api.openai_errors``) and for
    middleware that answers before the router (``api.middleware.BodyLimit``).
    """
    shapes = ErrorShapes()
    reply = shapes.reply

    @app.exception_handler(TokenRelayError)
    async def _domain(request: Request, exc: TokenRelayError) -> JSONResponse:
        return reply(request, Failure.of(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reply(request, _validation_failure(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return reply(request, Failure(exc.status_code, code, message))

    @app.exception_handler(RedisError)
    async def _redis(request: Request, exc: RedisError) -> JSONResponse:
        logger.warning("redis unavailable: %s", exc)
        return reply(request, Failure(503, "redis_unavailable", "storage is unavailable",
                                      retry_after=2))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return reply(request, Failure(500, "internal_error", "internal error"))

    return shapes
