"""Terminal clients: ``chat`` starts a generation and prints it, ``watch`` follows one.

Both print only the answer's text on stdout (so it can be piped) and everything
else on stderr: a spinner while nothing has arrived yet (only on a terminal),
and a summary line at the end. A dropped connection is resumed silently with
``Last-Event-ID``, so the printed text is exactly the generation's text.

Exit codes (docs/cli.md): 0 completed, 1 the generation failed, 2 the server
refused the request (4xx, or bad arguments), 3 cancelled, 4 server unreachable
or unavailable, 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import httpx
from httpx_sse import ServerSentEvent, connect_sse
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner as RichSpinner
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:8000"

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


class Spinner:
    """A one-line spinner on stderr while nothing has been printed; silent unless a terminal."""

    def __init__(self, console: Console):
        self.console = console
        self.enabled = console.is_terminal and not console.is_dumb_terminal
        self.label = ""
        self._spinner = RichSpinner("dots", text=Text())
        self._live: Live | None = None

    def start(self, label: str) -> None:
        self.update(label)
        if not self.enabled or self._live is not None:
            return
        # Live draws from a thread of its own; stdout is the answer's, so leave it alone.
        self._live = Live(self._spinner, console=self.console, transient=True,
                          refresh_per_second=12.5, redirect_stdout=False, redirect_stderr=False)
        self._live.start(refresh=True)  # draw the first frame now, not a tick later

    def update(self, label: str) -> None:
        self.label = label
        self._spinner.update(text=Text(label))  # a Text: no markup in labels

    def stop(self) -> None:
        if self._live is None:
            return
        self._live.stop()
        self._live = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def make_console(stream: TextIO) -> Console:
    """The console for stderr: colour only on a terminal, none with NO_COLOR (rich's rules);
    never wraps or highlights, and takes no markup, so server text is printed as it is."""
    return Console(file=stream, highlight=False, soft_wrap=True, markup=False, emoji=False)


def _check(response: httpx.Response) -> None:
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
            _check(source.response)
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


class Session:
    """One HTTP client plus the terminal it prints to."""

    def __init__(self, base_url: str, api_key: str | None, out: TextIO, err: TextIO,
                 stdin: TextIO, token: str | None = None, reconnect_for: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=httpx.Timeout(10.0, read=60.0))
        self.out, self.stdin = out, stdin
        self.err = make_console(err)
        self.spinner = Spinner(self.err)
        self.follower = Follower(self.client, out, self.err, self.spinner, token, reconnect_for)
        self.reconnect_for = reconnect_for

    def close(self) -> None:
        self.spinner.stop()
        self.client.close()

    def create_and_follow(self, body: dict[str, Any], outcome: Outcome) -> None:
        """POST with ``Accept: text/event-stream``; the answer is the stream itself.

        An Idempotency-Key makes it safe to send again when the connection broke after the
        request went out: the server answers with the same generation.
        """
        headers = {"Idempotency-Key": f"cli-{uuid.uuid4()}"}
        delay = 0.1
        reached = False  # an attempt got through, so a refused connection means a restart
        outcome.sent_at = first_try = time.monotonic()
        while True:
            try:
                with connect_sse(self.client, "POST", "/v1/generations", json=body,
                                 headers=headers) as source:
                    _check(source.response)
                    outcome.gen_id = source.response.headers["x-generation-id"]
                    self.follower.follow(outcome, source.iter_sse())
                    return
            except (httpx.TransportError, ApiError) as exc:
                if outcome.gen_id is not None:
                    raise  # the follower already retried what can be retried
                refused = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if isinstance(exc, ApiError) and not exc.retryable:
                    raise
                if refused and not reached:
                    raise  # nothing listens there: say so now rather than retry for minutes
                reached = reached or not refused
                if time.monotonic() - first_try > self.reconnect_for:
                    raise Unreachable(f"could not create the generation: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def cancel(self, gen_id: str) -> str:
        """Ask the server to cancel; a sentence saying what happened."""
        try:
            response = self.client.post(f"/v1/generations/{gen_id}/cancel")
        except httpx.TransportError as exc:
            return f"could not reach the server to cancel: {exc}"
        if response.status_code == 409:
            return "it had already ended"
        if response.status_code >= 400:
            return f"cancel refused: {ApiError(response.status_code, response.text)}"
        return "cancelled"

    def watch_hint(self, gen_id: str, last_id: str | None) -> str:
        url = "" if self.base_url == DEFAULT_URL else f" --url {self.base_url}"
        hint = f"tokenrelay watch {gen_id}{url}"
        if last_id:
            return f"{hint}   (add --after {last_id} to continue from here)"
        return hint


def chat(base_url: str, prompt: str, model: str | None, api_key: str | None,
         max_tokens: int | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
         stdin: TextIO = sys.stdin) -> int:
    """Start a generation and print it; see the module docstring for the exit codes.

    Without ``model`` the server picks its default (``TOKENRELAY_DEFAULT_MODEL``).
    """
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    if model is not None:
        body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    session = Session(base_url, api_key, out, err, stdin)
    outcome = Outcome()
    return _drive(session, outcome, base_url, "queued, waiting for a worker",
                  lambda: session.create_and_follow(body, outcome), ask=True)


def watch(base_url: str, target: str, after: str | None, api_key: str | None,
          token: str | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
          stdin: TextIO = sys.stdin) -> int:
    """Follow a generation (an id, or a share link) from the start or after an event id."""
    gen_id, base_url, token = _parse_target(target, base_url, token)
    session = Session(base_url, api_key, out, err, stdin, token=token)
    outcome = Outcome(gen_id=gen_id, last_id=after)
    return _drive(session, outcome, base_url, "waiting for the first token",
                  lambda: session.follower.follow(outcome), ask=False)


def _drive(session: Session, outcome: Outcome, base_url: str, waiting: str,
           run: Callable[[], object], *, ask: bool) -> int:
    """Run one client session to its exit code: Ctrl-C, refusals and unreachable servers
    end it the same way for ``chat`` and ``watch``."""
    try:
        session.spinner.start(waiting)
        run()
    except KeyboardInterrupt:
        session.spinner.stop()
        return _interrupted(session, outcome, ask=ask)
    except ApiError as exc:
        return _fail(session, f"error: {exc}", EXIT_REFUSED, outcome)
    except (httpx.TransportError, Unreachable) as exc:
        return _fail(session, f"error: cannot reach {base_url}: {exc}", EXIT_UNREACHABLE, outcome)
    finally:
        session.close()
    return _finish(outcome, session.out, session.err)


def _parse_target(target: str, base_url: str, token: str | None) -> tuple[str, str, str | None]:
    """An id, or a share link ``http://host/?view=ID&token=T`` (which also gives URL and token)."""
    if not target.startswith(("http://", "https://")):
        return target, base_url, token
    parts = urlsplit(target)
    query = parse_qs(parts.query)
    gen_id = query.get("view", [""])[0]
    return gen_id, f"{parts.scheme}://{parts.netloc}", token or query.get("token", [None])[0]


def _fail(session: Session, message: str, code: int, outcome: Outcome) -> int:
    session.spinner.stop()
    if outcome.text:
        session.out.write("\n")
        session.out.flush()
    session.err.print(Text.assemble(("error:", "bold red"), " ", message))
    if outcome.gen_id and code == EXIT_UNREACHABLE:
        session.err.print(f"the generation may still be running: "
                          f"{session.watch_hint(outcome.gen_id, outcome.last_id)}")
    return code


def _interrupted(session: Session, outcome: Outcome, ask: bool) -> int:
    out, err = session.out, session.err
    if outcome.text:
        out.write("\n")
        out.flush()
    if outcome.gen_id is None:
        err.print("interrupted before the server answered", style="yellow")
        return EXIT_INTERRUPTED
    if ask and _isatty(session.stdin):
        err.print(f"Cancel generation {outcome.gen_id}, or leave it running? "
                  "[c]ancel / [L]eave: ", end="", style="bold")
        try:
            answer = session.stdin.readline().strip().lower()
        except KeyboardInterrupt:
            answer = ""
        if answer.startswith("c"):
            err.print(f"{outcome.gen_id}: {session.cancel(outcome.gen_id)}")
            return EXIT_INTERRUPTED
    err.print(Text.assemble(("left running: ", "yellow"), outcome.gen_id))
    err.print(Text.assemble("follow it again: ",
                            (session.watch_hint(outcome.gen_id, outcome.last_id), "bold")))
    return EXIT_INTERRUPTED


_OUTCOME_STYLE = {"completed": "bold green", "failed": "bold red", "cancelled": "bold yellow"}


def _finish(outcome: Outcome, out: TextIO, err: Console) -> int:
    """End the answer's line, and print the summary line: outcome · details · id."""
    out.write("\n")
    out.flush()
    parts: list[str]
    if outcome.terminal == "done":
        head = "completed"
        parts = [str(outcome.data.get("finish_reason") or "?")]
        usage = outcome.data.get("usage") or {}
        if usage:
            parts.append(f"{usage.get('prompt_tokens', '?')} prompt + "
                         f"{usage.get('completion_tokens', '?')} completion tokens")
    elif outcome.terminal == "error":
        head = "failed"
        parts = [f"{outcome.data.get('code')}: {outcome.data.get('message')}"]
    else:
        head, parts = outcome.terminal, []
    if outcome.ttft_s is not None:
        parts.append(f"first token {outcome.ttft_s * 1000:.0f} ms")
    parts.append(str(outcome.gen_id))
    line = Text()
    line.append("[", style="dim")
    line.append(head, style=_OUTCOME_STYLE.get(head, "bold"))
    for part in parts:
        line.append(" · ", style="dim")
        line.append(part, style="dim" if part == parts[-1] else "")
    line.append("]", style="dim")
    err.print(line)
    return outcome.exit_code
