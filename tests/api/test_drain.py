"""SIGTERM on an API process ends every open event stream at once with a reconnect hint, idle
ones included (a queued generation with no worker yet sends nothing that could wake it)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.client import create
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.slow


def test_sigterm_ends_an_idle_stream_at_once() -> None:
    """A viewer of a generation that nothing is writing to gets the hint, and the API exits
    well before uvicorn's graceful-shutdown timeout."""
    s = Stack(apis=1, workers=0)  # no worker: the generation stays queued, its stream idle
    try:
        gen_id = create(s.url, model="fake:echo", prompt="nobody runs me")["id"]
        body = bytearray()

        def view() -> None:
            try:
                with httpx.stream("GET", f"{s.url}/v1/generations/{gen_id}/events",
                                  timeout=httpx.Timeout(10, read=30)) as response:
                    for chunk in response.iter_bytes():
                        body.extend(chunk)
            except httpx.HTTPError:
                pass

        viewer = threading.Thread(target=view, daemon=True)
        viewer.start()
        wait_for(lambda: b"queued" in body, 10, what="the queued event")
        api = s.apis[0].popen
        start = time.monotonic()
        api.send_signal(signal.SIGTERM)
        api.wait(15)
        took = time.monotonic() - start
        viewer.join(5)
        assert b"shutting down, reconnect" in body, bytes(body)
        assert took < 2.0, f"the API took {took:.1f}s to stop"
    finally:
        s.stop()
