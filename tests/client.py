"""Small HTTP helpers for end-to-end tests (httpx and httpx-sse, clients we did not write)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import connect_sse

from shared.events import Event


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
