"""OpenAI's error shape on the OpenAI-compatible paths, so the openai SDK raises its usual types.

    OpenAIError(TokenRelayError)    raised by the facade; rendered as
                                    {"error": {"message", "type", "param", "code"}}
    OpenAIErrorShape                ASGI middleware: on OpenAI paths, rewrites every other
                                    error body (auth, 404/405, 413, 429, 503...) from the
                                    native {"error": {"code", "message"}} into that shape

The native API keeps its own shape; only paths under ``OPENAI_PATHS`` change.
OpenAI never answers 422, so a 422 there becomes a 400 (``BadRequestError``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay.shared.errors import TokenRelayError

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")

# OpenAI's `type` for each status (https://platform.openai.com/docs/guides/error-codes).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def is_openai_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PATHS)


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    status: int, code: str, message: str, param: str | None = None, type_: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type_ or error_type(status),
            "param": param,
            "code": code,
        }
    }


class OpenAIError(TokenRelayError):
    """A failure of the OpenAI facade: status, code, the offending ``param``, extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message, code=code, retry_after=retry_after)
        self.status = status
        self.param = param
        self.type = type_
        self.headers = dict(headers or {})


def _render(exc: OpenAIError) -> JSONResponse:
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(
        error_body(exc.status, exc.code, exc.message, exc.param, exc.type),
        status_code=exc.status,
        headers=headers,
    )


class OpenAIErrorShape:
    """Rewrites native error bodies into OpenAI's shape on the OpenAI-compatible paths."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_openai_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # the response start of an error, until its body is read
        body = bytearray()

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] >= 400 and is_json:
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start, payload = _translate(held, bytes(body))
                held = None
                await send(start)
                await send({"type": "http.response.body", "body": payload})
                return
            await send(message)

        await self.app(scope, receive, rewrite)


def _translate(start: Message, payload: bytes) -> tuple[Message, bytes]:
    status: int = start["status"]
    try:
        data = json.loads(payload)
        error = data["error"]
        if "type" in error:  # already OpenAI-shaped (an OpenAIError)
            return start, payload
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return start, payload
    if status == 422:
        status = 400
    new = json.dumps(error_body(status, code, message)).encode()
    headers = [
        (name, value) for name, value in start.get("headers", []) if name != b"content-length"
    ]
    headers.append((b"content-length", str(len(new)).encode()))
    return {**start, "status": status, "headers": headers}, new


def add_openai_errors(app: FastAPI) -> None:
    """Render OpenAIError, and translate every other error body on the OpenAI paths.

    Call after the app's other middleware, so that this one is outermost and also
    sees their error responses (413 from the body limit).
    """

    async def _handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:  # counted like the native errors (api.errors)
            metrics.errors.labels(exc.code).inc()
        return _render(exc)

    app.add_exception_handler(OpenAIError, _handler)
    app.add_middleware(OpenAIErrorShape)
