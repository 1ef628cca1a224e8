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

import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import httpx
from httpx_sse import connect_sse
from rich.text import Text

from tokenrelay.cli.stream import (
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    ApiError,
    Follower,
    Outcome,
    Unreachable,
    check,
)
from tokenrelay.cli.terminal import Spinner, finish, isatty, make_console

DEFAULT_URL = "http://127.0.0.1:8000"


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
                    check(source.response)
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
    return drive(session, outcome, base_url, "queued, waiting for a worker",
                  lambda: session.create_and_follow(body, outcome), ask=True)


def watch(base_url: str, target: str, after: str | None, api_key: str | None,
          token: str | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
          stdin: TextIO = sys.stdin) -> int:
    """Follow a generation (an id, or a share link) from the start or after an event id."""
    gen_id, base_url, token = _parse_target(target, base_url, token)
    session = Session(base_url, api_key, out, err, stdin, token=token)
    outcome = Outcome(gen_id=gen_id, last_id=after)
    return drive(session, outcome, base_url, "waiting for the first token",
                  lambda: session.follower.follow(outcome), ask=False)


def drive(session: Session, outcome: Outcome, base_url: str, waiting: str,
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
    return finish(outcome, session.out, session.err)


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
    if ask and isatty(session.stdin):
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
