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
    ├── UpstreamError               upstream_error (retryable unless the upstream refused it)
    └── UnknownModel                unknown_model
"""

from __future__ import annotations


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

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UpstreamError(ProviderError):
    """The upstream failed; ``upstream_status`` is its HTTP status when it answered with one."""

    code = "upstream_error"
    retryable = True

    def __init__(self, message: str, *, retryable: bool = True,
                 upstream_status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.upstream_status = upstream_status


class UnknownModel(ProviderError):
    code = "unknown_model"
