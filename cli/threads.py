"""Conversations in the terminal: ``chat --thread ID PROMPT`` adds a turn to a thread,
``chat`` with no prompt on a terminal is an interactive session, ``threads`` lists them.

An answer prints like ``chat``'s (stdout, resumed silently after a drop). Messages are
posted with ``if_busy=enqueue`` unless told otherwise: a thread's previous answer frees
the thread a moment after its last event, and an answer another device is writing
should delay this one, not refuse it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any, TextIO

import httpx
from httpx_sse import connect_sse
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tokenrelay.cli.client import Session, drive
from tokenrelay.cli.stream import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    ApiError,
    Outcome,
    Unreachable,
    check,
)


def get_thread(session: Session, thread_id: str) -> dict[str, Any]:
    response = session.client.get(f"/v1/threads/{thread_id}")
    check(response)
    data: dict[str, Any] = response.json()
    return data


def post_and_follow(session: Session, thread_id: str, body: dict[str, Any],
                    outcome: Outcome) -> None:
    """Post a message and print its answer as it streams.

    Thread messages take no Idempotency-Key, so a post whose answer was lost is not
    simply sent again: the thread is read first, and a user message with this content
    beyond the ones it had before is the one this post made.
    """
    seen = len(get_thread(session, thread_id)["messages"])
    outcome.sent_at = first_try = time.monotonic()
    delay, attempt = 0.1, 0
    while True:
        try:
            if attempt:
                landed = _landed(session, thread_id, seen, body["content"])
                if landed is not None:
                    outcome.gen_id = landed
                    session.follower.follow(outcome)
                    return
            attempt += 1
            with connect_sse(session.client, "POST", f"/v1/threads/{thread_id}/messages",
                             json=body) as source:
                check(source.response)
                outcome.gen_id = source.response.headers["x-generation-id"]
                session.follower.follow(outcome, source.iter_sse())
                return
        except (httpx.TransportError, ApiError) as exc:
            if outcome.gen_id is not None or (isinstance(exc, ApiError) and not exc.retryable):
                raise  # the follower already retried what can be retried
            if time.monotonic() - first_try > session.reconnect_for:
                raise Unreachable(f"could not post the message: {exc}") from exc
            time.sleep(delay)  # back off before trying again; not waiting on a condition
            delay = min(delay * 2, 2.0)


def _landed(session: Session, thread_id: str, seen: int, content: str) -> str | None:
    """The generation answering ``content`` if an earlier post of it reached the thread."""
    for message in get_thread(session, thread_id)["messages"][seen:]:
        if message["role"] == "user" and message["content"] == content:
            return str(message["generation_id"])
    return None


def message_body(content: str, model: str | None, max_tokens: int | None,
                 if_busy: str) -> dict[str, Any]:
    body: dict[str, Any] = {"content": content, "if_busy": if_busy}
    if model is not None:
        body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def chat_thread(session: Session, thread_id: str, body: dict[str, Any]) -> int:
    """One turn of a thread, with ``chat``'s output, Ctrl-C question and exit codes."""
    outcome = Outcome()
    return drive(session, outcome, session.base_url, "waiting for the answer",
                 lambda: post_and_follow(session, thread_id, body, outcome), ask=True)


class Interactive:
    """A prompt line, the answer streamed below it, until Ctrl-D or ``/exit``."""

    PROMPT = "› "

    def __init__(self, session: Session, body: dict[str, Any]):
        self.session = session
        self.body = body  # the message body less its content

    def run(self, thread_id: str | None, system: str | None) -> int:
        session, err = self.session, self.session.err
        try:
            import readline  # noqa: F401  (line editing and ↑ history for input())
        except ImportError:  # not on every platform; input() works without it
            pass
        try:
            thread, made = self._open(thread_id, system)
        except ApiError as exc:
            session.close()
            return _error(err, str(exc), EXIT_REFUSED)
        except httpx.TransportError as exc:
            session.close()
            return _error(err, f"cannot reach {session.base_url}: {exc}", EXIT_UNREACHABLE)
        thread_id = str(thread["id"])
        err.print(Text.assemble(("thread ", "dim"), (thread_id, "bold"),
                                ("   Ctrl-C stops an answer · Ctrl-D or /exit quits", "dim")))
        if thread.get("active_generation_id"):  # being written now: follow it from its start
            self._answer(session.follower.follow,
                         Outcome(gen_id=thread["active_generation_id"]))
        sent = 0
        while (line := self._read()) is not None:
            if not line:
                continue
            self._answer(partial(post_and_follow, session, thread_id,
                                 {**self.body, "content": line}), Outcome())
            sent += 1
        session.out.write("\n")
        if made and not sent:  # leave no empty thread behind
            session.client.delete(f"/v1/threads/{thread_id}")
        else:
            err.print(Text.assemble("continue it: ",
                                    (f"tokenrelay chat --thread {thread_id}", "bold")))
        session.close()
        return EXIT_OK

    def _open(self, thread_id: str | None, system: str | None) -> tuple[dict[str, Any], bool]:
        """The thread (its history printed), and whether it was made here."""
        session = self.session
        if thread_id is None:
            body = {k: v for k, v in (("system", system), ("model", self.body.get("model")))
                    if v is not None}
            response = session.client.post("/v1/threads", json=body)
            check(response)
            return {**response.json(), "messages": []}, True
        thread = get_thread(session, thread_id)
        for message in thread["messages"]:
            if message.get("generation_id") == thread.get("active_generation_id") and \
                    message["role"] == "assistant":
                continue  # followed live below
            if message["role"] == "user":
                session.out.write(f"{self.PROMPT}{message['content']}\n")
            else:
                session.out.write(f"{message['content']}\n")
        session.out.flush()
        return thread, False

    def _read(self) -> str | None:
        """The next line typed (stripped); None to quit. Ctrl-C at the prompt clears it."""
        while True:
            try:
                line = input(self.PROMPT).strip()
            except EOFError:
                return None
            except KeyboardInterrupt:
                self.session.out.write("\n")
                continue
            return None if line in ("/exit", "/quit") else line

    def _answer(self, run: Callable[[Outcome], object], outcome: Outcome) -> None:
        """Print one answer; Ctrl-C cancels it and comes back to the prompt."""
        session, err = self.session, self.session.err
        try:
            session.spinner.start("waiting for the answer")
            run(outcome)
        except KeyboardInterrupt:
            session.spinner.stop()
            session.out.write("\n")
            if outcome.gen_id is not None:
                err.print(f"[stopped: {session.cancel(outcome.gen_id)}]", style="yellow")
            else:
                err.print("[interrupted before the server answered]", style="yellow")
            return
        except ApiError as exc:
            _error(err, str(exc), EXIT_REFUSED)
            return
        except (httpx.TransportError, Unreachable) as exc:
            _error(err, f"cannot reach {session.base_url}: {exc}", EXIT_UNREACHABLE)
            return
        finally:
            session.spinner.stop()
        session.out.write("\n")
        session.out.flush()
        if outcome.terminal == "error":
            err.print(f"[failed · {outcome.data.get('code')}: {outcome.data.get('message')}]",
                      style="red")
        elif outcome.terminal == "cancelled":
            err.print("[cancelled]", style="yellow")


def _error(err: Console, message: str, code: int) -> int:
    err.print(Text.assemble(("error:", "bold red"), " ", message))
    return code


def ago(at: float, now: float) -> str:
    """A moment as people say it: "just now", "5 min ago", "3 h ago", else the date."""
    seconds = now - at
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h ago"
    return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M")


def list_threads(session: Session, limit: int, as_json: bool) -> int:
    """``tokenrelay threads``: the caller's threads, newest activity first."""
    try:
        response = session.client.get("/v1/threads", params={"limit": limit})
        check(response)
    except ApiError as exc:
        return _error(session.err, str(exc), EXIT_REFUSED)
    except httpx.TransportError as exc:
        return _error(session.err, f"cannot reach {session.base_url}: {exc}", EXIT_UNREACHABLE)
    finally:
        session.close()
    page = response.json()
    if as_json:
        session.out.write(json.dumps(page, indent=2) + "\n")
        return EXIT_OK
    show_threads(page["data"], session.out, time.time())
    return EXIT_OK


def show_threads(threads: list[dict[str, Any]], out: TextIO, now: float) -> None:
    console = Console(file=out, highlight=False, markup=False, emoji=False)
    if not threads:
        console.print("no threads yet: start one with `tokenrelay chat`")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("thread", no_wrap=True)
    table.add_column("title", overflow="ellipsis", no_wrap=True, max_width=50)
    table.add_column("last activity", no_wrap=True)
    table.add_column("messages", justify="right", no_wrap=True)
    for thread in threads:
        count = str(thread.get("message_count", "?"))
        if thread.get("active_generation_id"):
            count += " (answering)"
        table.add_row(thread["id"], thread["title"] or "(empty)",
                      ago(float(thread["updated_at"]), now), count)
    console.print(table)
