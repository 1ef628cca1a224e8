"""OpenAI's error shape on the OpenAI-compatible paths, so the openai SDK raises its usual types.

    OpenAIError(TokenRelayError)    raised by the facade: status, code, message, param, type
    openai_shape                    every failure on ``OPENAI_PATHS`` (OpenAIError, auth,
                                    404/405, 413, 429, 503...) rendered as
                                    {"error": {"message", "type", "param", "code"}}

The native API keeps its own shape; only paths under ``OPENAI_PATHS`` change.
OpenAI never answers 422, so a 422 there becomes a 400 (``BadRequestError``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tokenrelay.api.errors import ErrorShapes, Failure
from tokenrelay.shared.errors import TokenRelayError

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models", "/v1/responses")

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


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_shape(failure: Failure) -> tuple[int, dict[str, Any]]:
    status = 400 if failure.status == 422 else failure.status
    return status, {
        "error": {
            "message": failure.message,
            "type": failure.type or error_type(status),
            "param": failure.param,
            "code": failure.code,
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

    @property
    def failure(self) -> Failure:
        return Failure(self.status, self.code, self.message, self.retry_after, self.param,
                       self.type, self.headers)

    def body(self) -> dict[str, Any]:
        """The error object, as sent in a stream that cannot end with an HTTP status."""
        return openai_shape(self.failure)[1]


def add_openai_errors(app: FastAPI, shapes: ErrorShapes) -> None:
    """Answer every failure on the OpenAI paths in OpenAI's shape, OpenAIError included."""
    shapes.add(OPENAI_PATHS, openai_shape)

    async def _handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return shapes.reply(request, exc.failure)

    app.add_exception_handler(OpenAIError, _handler)
