"""Maps every failure to the ``{"error": {"code", "message"}}`` body, in one place."""

from __future__ import annotations

import json
import logging

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


def error_response(
    status: int, code: str, message: str, retry_after: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _describe(errors: list[dict[str, object]]) -> str:
    parts = []
    for err in errors[:5]:
        path: tuple[object, ...] = tuple(err.get("loc", ()))  # type: ignore[arg-type]
        loc = ".".join(str(p) for p in path if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts)


def _reply(
    request: Request, status: int, code: str, message: str, retry_after: int | None = None
) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(code).inc()
    return error_response(status, code, message, retry_after)


def add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(TokenRelayError)
    async def _domain(request: Request, exc: TokenRelayError) -> JSONResponse:
        return _reply(request, exc.status, exc.code, exc.message, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return _reply(request, 400, "invalid_json", "request body is not valid JSON")
        if isinstance(exc.body, bytes | str):  # a body sent without a JSON content type
            try:
                json.loads(exc.body)
            except ValueError:
                return _reply(request, 400, "invalid_json", "request body is not valid JSON")
            return _reply(request, 
                415, "unsupported_media_type", "send the body with Content-Type: application/json"
            )
        return _reply(request, 422, "validation_error", _describe(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return _reply(request, exc.status_code, code, message)

    @app.exception_handler(RedisError)
    async def _redis(request: Request, exc: RedisError) -> JSONResponse:
        logger.warning("redis unavailable: %s", exc)
        return _reply(request, 503, "redis_unavailable", "storage is unavailable", retry_after=2)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _reply(request, 500, "internal_error", "internal error")
