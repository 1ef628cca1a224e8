"""Terminal clients: ``chat`` starts a generation and prints it, ``watch`` follows one.

Both resume transparently after a dropped connection (``Last-Event-ID``), so the
printed text is exactly the generation's text.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
from httpx_sse import ServerSentEvent, connect_sse

EXIT_OK = 0
EXIT_FAILED = 1  # the generation ended with an error
EXIT_USAGE = 2  # the server refused the request
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4

RETRYABLE = (httpx.TransportError, httpx.RemoteProtocolError)


@dataclass
class Outcome:
    gen_id: str
    terminal: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def exit_code(self) -> int:
        return {"done": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(self.terminal, EXIT_FAILED)


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _check(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
        raise ApiError(response.status_code, response.text)


class Follower:
    """Prints one generation's text as it arrives and resumes after drops."""

    def __init__(self, client: httpx.Client, out: TextIO, err: TextIO, max_retries: int = 30):
        self.client = client
        self.out = out
        self.err = err
        self.max_retries = max_retries

    def _handle(self, sse: ServerSentEvent, outcome: Outcome) -> bool:
        """Print one event; True once the terminal event arrived."""
        data = json.loads(sse.data) if sse.data else {}
        if sse.event == "delta":
            text = data.get("content") or ""
            outcome.text += text
            self.out.write(text)
            self.out.flush()
        elif sse.event == "status" and data.get("status") == "restarted":
            outcome.text = ""
            self.err.write("\n[worker lost; the generation restarted]\n")
        elif sse.event in ("done", "cancelled", "error"):
            outcome.terminal, outcome.data = sse.event, data
            return True
        return False

    def follow(self, outcome: Outcome, events: Iterator[ServerSentEvent] | None,
               last_id: str | None = None) -> Outcome:
        retries = 0
        while True:
            try:
                if events is None:
                    headers = {"Last-Event-ID": last_id} if last_id else {}
                    events = self._open(outcome.gen_id, headers)
                for sse in events:
                    retries = 0
                    if sse.id:
                        last_id = sse.id
                    if self._handle(sse, outcome):
                        return outcome
                raise httpx.RemoteProtocolError("stream ended before its terminal event")
            except RETRYABLE:
                retries += 1
                if retries > self.max_retries:
                    raise
                events = None
                time.sleep(min(0.1 * 2**retries, 2.0))

    def _open(self, gen_id: str, headers: dict[str, str]) -> Iterator[ServerSentEvent]:
        with connect_sse(self.client, "GET", f"/v1/generations/{gen_id}/events",
                         headers=headers) as source:
            _check(source.response)
            yield from source.iter_sse()


def chat(base_url: str, prompt: str, model: str, api_key: str | None,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    with httpx.Client(base_url=base_url, headers=_headers(api_key),
                      timeout=httpx.Timeout(10.0, read=60.0)) as client:
        follower = Follower(client, out, err)
        body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        try:
            with connect_sse(client, "POST", "/v1/generations", json=body) as source:
                _check(source.response)
                gen_id = source.response.headers["x-generation-id"]
                outcome = Outcome(gen_id)
                follower.follow(outcome, source.iter_sse())
        except ApiError as exc:
            err.write(f"error: {exc}\n")
            return EXIT_USAGE
        except httpx.TransportError as exc:
            err.write(f"error: cannot reach {base_url}: {exc}\n")
            return EXIT_UNREACHABLE
    return _finish(outcome, out, err)


def watch(base_url: str, gen_id: str, after: str | None, api_key: str | None,
          out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    with httpx.Client(base_url=base_url, headers=_headers(api_key),
                      timeout=httpx.Timeout(10.0, read=60.0)) as client:
        outcome = Outcome(gen_id)
        try:
            Follower(client, out, err).follow(outcome, None, after)
        except ApiError as exc:
            err.write(f"error: {exc}\n")
            return EXIT_USAGE
        except httpx.TransportError as exc:
            err.write(f"error: cannot reach {base_url}: {exc}\n")
            return EXIT_UNREACHABLE
    return _finish(outcome, out, err)


def _finish(outcome: Outcome, out: TextIO, err: TextIO) -> int:
    out.write("\n")
    out.flush()
    if outcome.terminal == "done":
        usage = outcome.data.get("usage") or {}
        err.write(f"[{outcome.data.get('finish_reason')} · {usage.get('completion_tokens', '?')} "
                  f"tokens · {outcome.gen_id}]\n")
    elif outcome.terminal == "error":
        err.write(f"[error {outcome.data.get('code')}: {outcome.data.get('message')} · "
                  f"{outcome.gen_id}]\n")
    else:
        err.write(f"[{outcome.terminal} · {outcome.gen_id}]\n")
    return outcome.exit_code
