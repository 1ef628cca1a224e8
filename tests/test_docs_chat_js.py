"""The browser chat of docs/clients.md ("A chat in the browser, reload included"), run as
written in Debian's Chromium against a real stack: send, reload mid-answer, resume."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MISSING, TIMEOUT_MS
from tests.stack import ROOT, Stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

if MISSING is None:
    from playwright.sync_api import sync_playwright
if TYPE_CHECKING:
    from playwright.sync_api import Page

SECTION = "### A chat in the browser, reload included"
# The page's part: a bubble per message, as an application would draw them.
SHOW = """
function show(role, text) {
  const bubble = document.createElement("p");
  bubble.className = role;
  bubble.textContent = text;
  document.body.append(bubble);
  return bubble;
}
"""


def snippet(base: str) -> str:
    """The documented JavaScript, pointed at ``base`` instead of localhost:8000."""
    doc = (ROOT / "docs" / "clients.md").read_text()
    found = re.search(r"```js\n(.*?)```", doc.split(SECTION, 1)[1], re.S)
    assert found, f"no js block under {SECTION!r}"
    code = found.group(1)
    assert 'const API = "http://localhost:8000";' in code
    return code.replace("http://localhost:8000", base) + SHOW


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """A fake model slow enough to reload in the middle of its answer (20 words/s)."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_FAKE_TPS": "20"})
    yield s
    s.stop()


@pytest.fixture
def page(stack: Stack) -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context()
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert not errors, errors


def load(page: Page, url: str) -> None:
    """An empty document of the API's origin with the snippet loaded."""
    page.add_script_tag(content=snippet(url))
    wait_for(lambda: page.evaluate("typeof reopen") == "function", 10, what="the snippet")


def bubbles(page: Page) -> list[tuple[str, str]]:
    found: list[Any] = page.evaluate(
        "[...document.querySelectorAll('p')].map(p => [p.className, p.textContent])")
    return [(role, text) for role, text in found]


def thread(url: str, thread_id: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{url}/v1/threads/{thread_id}", timeout=10).json()
    return data


def test_documented_browser_chat_sends_reloads_and_resumes(stack: Stack, page: Page) -> None:
    """Two turns sent with `send`, a reload mid-answer, `reopen`: the history is drawn, the
    answer resumes with `?after=` and ends equal to the thread's message, no word twice."""
    made = httpx.post(f"{stack.url}/v1/threads", json={"model": "fake:echo"}, timeout=10)
    thread_id = made.json()["id"]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{stack.url}/healthz")
    load(page, stack.url)

    page.evaluate("([id, text]) => send(id, text)", [thread_id, "hello from the docs"])
    wait_for(lambda: thread(stack.url, thread_id)["active_generation_id"] is None, 20,
             what="the first answer")
    wait_for(lambda: bubbles(page) == [("user", "hello from the docs"),
                                       ("assistant", "hello from the docs")], 10,
             what="the first answer drawn")

    long = " ".join(f"word{i}" for i in range(60))  # 3 s of answer: time to reload in it
    page.evaluate("([id, text]) => send(id, text)", [thread_id, long])
    gen_id = wait_for(lambda: thread(stack.url, thread_id)["active_generation_id"], 10,
                      what="the second answer to start")
    wait_for(lambda: len(bubbles(page)) == 4 and len(bubbles(page)[3][1].split()) >= 5, 10,
             what="the second answer's first words")
    page.reload()
    assert bubbles(page) == []
    load(page, stack.url)
    page.evaluate("(id) => reopen(id)", thread_id)
    final = wait_for(lambda: (t := thread(stack.url, thread_id))["active_generation_id"] is None
                     and t, 30, what="the second answer to end")
    answer = final["messages"][3]
    assert answer["generation_id"] == gen_id and answer["status"] == "completed"
    assert answer["content"] == long
    wait_for(lambda: bubbles(page)[3:] == [("assistant", answer["content"])], 10,
             what="the resumed answer drawn in full")
    assert bubbles(page)[:3] == [("user", "hello from the docs"),
                                 ("assistant", "hello from the docs"), ("user", long)]
    resumed = [u for u in requests if f"/v1/threads/{thread_id}/stream?after=" in u]
    assert resumed, requests  # the reload resumed after the saved event, not from the start
