"""The HTTP side of the terminal clients: a generation's event stream, printed as it
arrives and reopened with ``Last-Event-ID`` after a drop, and what one run saw.

Exit codes (docs/cli.md): 0 completed, 1 the generation failed, 2 the server
refused the request (4xx, or bad arguments), 3 cancelled, 4 server unreachable
or unavailable, 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import httpx
from httpx_sse import ServerSentEvent, connect_sse

if TYPE_CHECKING:
    from rich.console import Console

    from tokenrelay.cli.terminal import Spinner

EXIT_OK = 0
EXIT_FAILED = 1  # the generation ended with an error event
EXIT_REFUSED = 2  # the server answered 4xx (unknown id, bad model, no key, ...)
EXIT_CANCELLED = 3  # the generation was cancelled (by anyone)
EXIT_UNREACHABLE = 4  # could not reach the server, or it stayed unavailable (5xx)
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it

TERMINAL_EVENTS = ("done", "cancelled", "error")


class ApiError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, body: str):
        self.status = status
        try:
            error = json.loads(body)["error"]
            detail = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            detail = body.strip()[:200] or "no details"
        super().__init__(f"{detail} (HTTP {status})")

    @property
    def retryable(self) -> bool:
        # 5xx: a restart or an overload that passes. A 429 is the caller's own limit: report it.
        return self.status >= 500


class StreamBroken(Exception):
    """The event stream ended before its terminal event."""


class Unreachable(Exception):
    """Could not (re)connect before the deadline."""


@dataclass
class Outcome:
    """What one run of ``chat`` or ``watch`` saw."""

    gen_id: str | None = None
    last_id: str | None = None
    queued_id: str | None = None  # the `queued` event's id, if seen (following from the start)
    terminal: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    sent_at: float | None = None  # monotonic time the prompt was sent (chat only)
    ttft_s: float | None = None

    @property
    def exit_code(self) -> int:
        return {"done": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(self.terminal, EXIT_FAILED)


def check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
        raise ApiError(response.status_code, response.text)


class Follower:
    """Prints one generation's text as it arrives; reopens the stream after drops."""

    def __init__(self, client: httpx.Client, out: TextIO, err: Console, spinner: Spinner,
                 token: str | None = None, reconnect_for: float = 120.0):
        self.client = client
        self.out = out
        self.err = err
        self.spinner = spinner
        self.token = token
        self.reconnect_for = reconnect_for

    def follow(self, outcome: Outcome, events: Iterator[ServerSentEvent] | None = None) -> None:
        """Handle events until the terminal one. ``events``: an already open stream, if any."""
        down_since: float | None = None
        delay = 0.1
        while True:
            try:
                if events is None:
                    events = self._open(outcome)
                for sse in events:
                    down_since, delay = None, 0.1
                    if self._handle(sse, outcome):
                        return
                raise StreamBroken("the stream ended before its terminal event")
            except (httpx.TransportError, StreamBroken, ApiError) as exc:
                if isinstance(exc, ApiError) and not exc.retryable:
                    raise
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.reconnect_for:
                    raise Unreachable(f"gave up reconnecting after {self.reconnect_for:.0f}s: "
                                      f"{exc}") from exc
                events = None
                time.sleep(delay)  # back off before reconnecting; not waiting on a condition
                delay = min(delay * 2, 2.0)

    def _open(self, outcome: Outcome) -> Iterator[ServerSentEvent]:
        headers = {"Last-Event-ID": outcome.last_id} if outcome.last_id else {}
        params = {"token": self.token} if self.token else None
        with connect_sse(self.client, "GET", f"/v1/generations/{outcome.gen_id}/events",
                         headers=headers, params=params) as source:
            check(source.response)
            yield from source.iter_sse()

    def _handle(self, sse: ServerSentEvent, outcome: Outcome) -> bool:
        """Print one event; True once the terminal event arrived."""
        if sse.event not in ("status", "delta", *TERMINAL_EVENTS):
            return False  # the `retry:` frame, or an event type this client doesn't know
        if sse.id:
            outcome.last_id = sse.id
        data = json.loads(sse.data) if sse.data else {}
        if sse.event == "status":
            status = data.get("status")
            if status == "queued":
                outcome.queued_id = sse.id or None
            elif status == "running":
                self.spinner.update("running, waiting for the first token")
            elif status == "restarted":
                # The job restarted on another worker and its text starts over. What is
                # printed cannot be taken back: say so, and print the new text on a new line.
                self.spinner.stop()
                outcome.text = ""
                outcome.ttft_s = None
                self.out.write("\n")
                self.out.flush()
                self.err.print("[the worker was lost; the answer restarts below]", style="yellow")
        elif sse.event == "delta":
            text = data.get("content") or ""
            if text:
                self.spinner.stop()
                if outcome.ttft_s is None:
                    outcome.ttft_s = self._ttft(outcome, sse.id)
                outcome.text += text
                self.out.write(text)
                self.out.flush()
        else:
            self.spinner.stop()
            outcome.terminal, outcome.data = sse.event, data
            return True
        return False

    @staticmethod
    def _ttft(outcome: Outcome, delta_id: str) -> float | None:
        if outcome.sent_at is not None:
            return time.monotonic() - outcome.sent_at
        if outcome.queued_id and delta_id:
            # Watching from the start: the ids' millisecond parts are append times on the
            # server's clock. Watching from a later event, the first token was never seen.
            return (_id_ms(delta_id) - _id_ms(outcome.queued_id)) / 1000
        return None


def _id_ms(event_id: str) -> int:
    return int(event_id.split("-", 1)[0])
