"""``/v1/ws`` from a browser's own WebSocket: Debian's chromium driven by Playwright (never a
downloaded browser), through the browser tests' harness (tests/browser.py: skipped when
chromium or playwright is missing, except in CI)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MISSING
from tests.client import collect
from tests.stack import Stack
from tokenrelay.shared.events import Event

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

KEY = "k-web"

# Runs in the page: opens the socket, authenticates with a message (a browser cannot set an
# Authorization header on a WebSocket), creates a generation and collects every message
# (pings aside) until its terminal event.
CHAT = """
async ({url, key}) => {
  const ws = new WebSocket(url);
  const messages = [];
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("the socket did not open"));
  });
  const ended = new Promise((resolve) => {
    ws.onmessage = (message) => {
      const body = JSON.parse(message.data);
      if (body.type !== "ping") messages.push(body);
      if (body.type === "event" && ["done", "cancelled", "error"].includes(body.event)) {
        resolve();
      }
    };
  });
  const request = {model: "fake:lorem", prompt: "browser", max_tokens: 12};
  ws.send(JSON.stringify({type: "create", request}));  // not authenticated yet: an error
  ws.send("{not json");  // an error too; the socket stays open
  ws.send(JSON.stringify({type: "auth", api_key: key, ref: "a"}));
  ws.send(JSON.stringify({type: "create", request, ref: "c"}));
  await ended;
  ws.close();
  return messages;
}
"""

# Runs in a page of another origin: the handshake is refused, the socket never opens.
FOREIGN = """
async (url) => await new Promise((resolve) => {
  const ws = new WebSocket(url);
  ws.onopen = () => resolve("open");
  ws.onclose = (event) => resolve("closed " + event.code);
})
"""


@pytest.fixture(scope="module")
def ws_stack() -> Iterator[Stack]:
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_API_KEYS": f"web:{KEY}"})
    yield s
    s.stop()


def test_browser_websocket_streams_a_generation_like_sse(ws_stack: Stack) -> None:
    """Chromium's WebSocket on the API's own origin authenticates by message, creates a generation and receives exactly the SSE stream's events; a page of another origin is refused."""
    from playwright.sync_api import sync_playwright

    ws_url = ws_stack.url.replace("http://", "ws://") + "/v1/ws"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{ws_stack.url}/healthz")  # the API's own origin
            messages: list[dict[str, Any]] = page.evaluate(CHAT, {"url": ws_url, "key": KEY})
            page.goto("data:text/html,<p>elsewhere</p>")  # origin "null"
            foreign = page.evaluate(FOREIGN, ws_url)
        finally:
            browser.close()
    head, events = messages[:5], messages[5:]
    assert [(m["type"], m.get("code"), m.get("ref")) for m in head] == [
        ("error", "unauthorized", None), ("error", "invalid_json", None),
        ("authenticated", None, "a"), ("created", None, "c"), ("subscribed", None, "c")]
    gen_id = head[3]["generation_id"]
    got = [Event(m["id"], m["event"], m["data"]) for m in events]
    assert all(m["type"] == "event" and m["generation_id"] == gen_id for m in events)
    assert got == collect(ws_stack.url, gen_id, headers={"Authorization": f"Bearer {KEY}"})
    assert got[-1].type == "done"
    assert foreign == "closed 1006"
