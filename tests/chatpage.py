"""The chat page as the browser tests drive it: send a message, read a bubble, check what
the thread stored, take the page's API process down and up again."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.browser import MISSING
from tests.stack import Stack, wait_for

if MISSING is None:
    from playwright.sync_api import expect
if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

KEY = "k-acme"
AUTH = {"Authorization": f"Bearer {KEY}"}
WITH_KEY = f"sessionStorage.setItem('tokenrelay.apiKey', '{KEY}')"  # as a user who typed it
LAST_ANSWER = ".msg[data-role=assistant] >> nth=-1"


def send(page: Page, prompt: str, model: str | None, max_tokens: int | None = None) -> Locator:
    """Send a message from the page; the bubble of its answer (which names its generation)."""
    answers = page.locator(".msg[data-role=assistant]")
    before = answers.count()
    page.fill("#prompt", prompt)
    if model is not None:
        page.fill("#model", model)
    page.fill("#max-tokens", str(max_tokens) if max_tokens else "")
    page.click("#send")
    expect(answers).to_have_count(before + 1)
    bubble = answers.nth(before)
    expect(bubble).to_have_attribute("data-gen", re.compile(r"^gen_\w+$"))
    return bubble


def tokens_in(bubble: Locator) -> int:
    text = bubble.locator(".tokens").text_content() or ""
    return int(text.split()[0]) if text else 0


def text_in(bubble: Locator) -> str:
    """The answer's text as the page drew it (its Markdown source)."""
    return bubble.get_attribute("data-text") or ""


def finished(page: Page, bubble: Locator, status_value: str) -> None:
    expect(bubble).to_have_attribute("data-status", status_value)
    expect(page.locator("#conn")).to_have_attribute("data-state", "ended")


def kill_page_api(stack: Stack) -> int:
    """Kill the API process the pages talk to (whichever serves its port now); the port."""
    port = stack.ports[0]
    for proc, serves in zip(stack.apis, stack.ports, strict=True):
        if serves == port:
            proc.kill()
    return port


def restart_page_api(stack: Stack, port: int) -> None:
    stack.add_api(port=port)
    stack.wait_ready(stack.url)


def thread_id(page: Page) -> str:
    return parse_qs(urlsplit(page.url).query)["thread"][0]


def thread(base: str, tid: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/v1/threads/{tid}", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def stored_answer(base: str, tid: str, gen_id: str) -> dict[str, Any]:
    """The thread's assistant message for ``gen_id``, once its answer has left the thread."""
    def ended() -> dict[str, Any] | None:
        body = thread(base, tid)
        found = [m for m in body["messages"]
                 if m["role"] == "assistant" and m["generation_id"] == gen_id]
        return found[0] if found and body["active_generation_id"] != gen_id else None
    result: dict[str, Any] = wait_for(ended, 10, what="the answer stored in the thread")
    return result
