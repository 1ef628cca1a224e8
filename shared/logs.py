"""Logging set-up: one format for every process, a request id on every line, JSON on demand."""

from __future__ import annotations

import contextvars
import json
import logging
import time

from tokenrelay.shared.errors import one_line

MESSAGE_LIMIT = 8000  # characters of one log message; the rest is cut

# The request being served (API) — "-" outside a request.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One event, one line: control characters in the message (a model name, an
    upstream's error text, anything a client or an upstream chose) are escaped, so
    none can start a forged line. A traceback below the message stays as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        original = record.message
        record.message = one_line(original, limit=MESSAGE_LIMIT)
        try:
            return super().formatMessage(record)
        finally:
            record.message = original


def configure(level: str, fmt: str) -> None:
    """Configure the root logger once, for the API or a worker process."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
