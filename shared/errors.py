"""The error tree of tokenrelay, mapped to HTTP in one place (``api.errors``).

    TokenRelayError                 code, message, status
    ├── BadRequest             400  invalid_json, invalid_request, unknown_model, invalid_event_id
    ├── Unauthorized           401  unauthorized
    ├── NotFound               404  not_found (also: another tenant's generation)
    ├── MethodNotAllowed       405  method_not_allowed
    ├── Conflict               409  conflict (e.g. cancel of an ended generation)
    ├── Gone                   410  gone (retention over)
    ├── PayloadTooLarge        413  payload_too_large
    ├── ValidationFailed       422  validation_error
    ├── TooManyRequests        429  rate_limited (+ Retry-After)
    └── Unavailable            503  unavailable, redis_unavailable (+ Retry-After)

    ProviderError                   raised by providers; becomes a terminal ``error`` event
    ├── UpstreamError               upstream_error: the upstream refused, failed or was
    │   │                           unreachable (retryable unless it refused: 400/401/403/404/422)
    │   └── UpstreamIncomplete      upstream_incomplete: its stream ended without a finish reason
    └── UnknownModel                unknown_model

A provider error's ``message`` is what clients see: short, generic, with no upstream
text in it. ``detail`` (the upstream's own words) goes to the log only, on one line.
"""

from __future__ import annotations

from typing import Any


class TokenRelayError(Exception):
    """Base of every error a client can be told about."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class BadRequest(TokenRelayError):
    status, code = 400, "invalid_request"


class Unauthorized(TokenRelayError):
    status, code = 401, "unauthorized"


class NotFound(TokenRelayError):
    status, code = 404, "not_found"


class MethodNotAllowed(TokenRelayError):
    status, code = 405, "method_not_allowed"


class Conflict(TokenRelayError):
    status, code = 409, "conflict"


class Gone(TokenRelayError):
    status, code = 410, "gone"


class PayloadTooLarge(TokenRelayError):
    status, code = 413, "payload_too_large"


class ValidationFailed(TokenRelayError):
    status, code = 422, "validation_error"


class TooManyRequests(TokenRelayError):
    status, code = 429, "rate_limited"


class Unavailable(TokenRelayError):
    status, code = 503, "unavailable"


class ProviderError(Exception):
    """A provider failed; the job turns it into exactly one terminal ``error`` event."""

    code = "provider_error"
    retryable = False

    def __init__(self, message: str, *, detail: str | None = None,
                 retryable: bool | None = None, data: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        if retryable is not None:
            self.retryable = retryable
        self.data = data or {}  # extra fields of the error event, e.g. upstream_status

    def __str__(self) -> str:
        """The log line: the client's message, then the upstream's own words (newlines escaped)."""
        if not self.detail:
            return self.message
        return f"{self.message}: {one_line(self.detail)}"

    def as_event(self) -> dict[str, Any]:
        """The data of the terminal ``error`` event."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable,
                **self.data}


class UpstreamError(ProviderError):
    """The upstream failed; ``upstream_status`` is its HTTP status when it answered with one."""

    code = "upstream_error"
    retryable = True

    @classmethod
    def for_status(cls, status: int, detail: str, **data: Any) -> UpstreamError:
        """The upstream answered HTTP ``status``: a generic message for clients, retryable
        only where a retry can help (408, 409, 429, 5xx), the status kept in the event."""
        return cls(_status_message(status), detail=detail,
                   retryable=status in RETRYABLE_STATUSES or status >= 500,
                   data={"upstream_status": status, **data})

    @property
    def upstream_status(self) -> int | None:
        status = self.data.get("upstream_status")
        return status if isinstance(status, int) else None


class UpstreamIncomplete(UpstreamError):
    """The upstream's stream ended (cleanly or not) before the model said it had finished."""

    code = "upstream_incomplete"


RETRYABLE_STATUSES = frozenset({408, 409, 429})  # and every 5xx


def _status_message(status: int) -> str:
    if status in (401, 403):
        return f"the upstream refused the credentials (HTTP {status})"
    if status == 404:
        return "the upstream does not know this model or endpoint (HTTP 404)"
    if status == 408:
        return "the upstream timed out (HTTP 408)"
    if status == 429:
        return "the upstream is rate limiting requests (HTTP 429)"
    if status >= 500:
        return f"the upstream failed (HTTP {status})"
    return f"the upstream rejected the request (HTTP {status})"


class UnknownModel(ProviderError):
    code = "unknown_model"


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` for one log line: control characters escaped, cut at ``limit`` characters."""
    escaped = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."
