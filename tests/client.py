"""Small HTTP helpers for end-to-end tests (httpx and httpx-sse, clients we did not write)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import connect_sse

from tokenrelay.shared.events import Event


def create(base: str, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{base}/v1/generations", json=body, headers=headers, timeout=10)
    assert response.status_code == 202, response.text
    data: dict[str, Any] = response.json()
    return data


def status(base: str, gen_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/generations/{gen_id}", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def collect(base: str, gen_id: str, after: str | None = None, limit: int | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30.0,
            params: dict[str, str] | None = None) -> list[Event]:
    """Events of one connection: until the terminal event, or ``limit`` events, then disconnect."""
    hdrs = dict(headers or {})
    if after is not None:
        hdrs["Last-Event-ID"] = after
    out: list[Event] = []
    with httpx.Client(timeout=httpx.Timeout(10.0, read=timeout)) as client, connect_sse(
        client, "GET", f"{base}/v1/generations/{gen_id}/events", headers=hdrs, params=params
    ) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            if not sse.data:
                continue  # a retry-only block: per the SSE spec, no event
            out.append(Event(sse.id, sse.event, json.loads(sse.data)))
            if out[-1].terminal or (limit is not None and len(out) >= limit):
                break
    return out


def text_of(events: list[Event]) -> str:
    """The text a client shows: content deltas, restarting at a ``restarted`` status."""
    text = ""
    for event in events:
        if event.type == "status" and event.data.get("status") == "restarted":
            text = ""
        elif event.type == "delta":
            text += event.data.get("content", "")
    return text


def follow(urls: list[str], gen_id: str, headers: dict[str, str] | None = None,
           timeout: float = 60.0, on_event: Any = None) -> list[Event]:
    """Events of a resilient viewer: on a dropped or refused connection it resumes with
    Last-Event-ID on the next URL in ``urls`` (round robin), until the terminal event."""
    import time

    out: list[Event] = []
    deadline = time.monotonic() + timeout
    attempt = 0
    while time.monotonic() < deadline:
        base = urls[attempt % len(urls)]
        attempt += 1
        hdrs = dict(headers or {})
        if out:
            hdrs["Last-Event-ID"] = out[-1].id
        try:
            with httpx.Client(timeout=httpx.Timeout(5.0, read=30.0)) as client, connect_sse(
                client, "GET", f"{base}/v1/generations/{gen_id}/events", headers=hdrs
            ) as source:
                if source.response.status_code != 200:
                    time.sleep(0.05)  # a 503 while a dependency restarts: retry shortly
                    continue
                for sse in source.iter_sse():
                    if not sse.data:
                        continue
                    out.append(Event(sse.id, sse.event, json.loads(sse.data)))
                    if on_event is not None:
                        on_event(out[-1])
                    if out[-1].terminal:
                        return out
        except httpx.HTTPError:
            time.sleep(0.05)  # the browser's EventSource waits `retry` ms; we wait less
    raise AssertionError(f"no terminal event within {timeout}s; got {len(out)} events")


def stored_generations(redis_url: str) -> set[bytes]:
    """The meta keys of every generation in the Redis at ``redis_url``: what a request
    that must create nothing must leave as it was (other keys change on their own)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return set(client.scan_iter("tr:{gen_*}:meta"))
    finally:
        client.close()
