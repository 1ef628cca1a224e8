"""The page at ``/`` in a real browser: Debian's chromium driven by Playwright (never a downloaded
browser). Screenshots go to build/screenshots/; with TOKENRELAY_DOCS_SCREENSHOTS=1 the one used in
the README is also written to docs/screenshot-web.png.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest

from tests.client import status
from tests.stack import ROOT, Stack, wait_for

CHROMIUM = Path(os.environ.get("TOKENRELAY_CHROMIUM", "/usr/bin/chromium"))
# The flags this machine needs: no sandbox as root, and no background traffic to the outside.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SHOTS = ROOT / "build" / "screenshots"
DOCS_SHOT = ROOT / "docs" / "screenshot-web.png"
TIMEOUT_MS = 20_000
_GEN_ID = re.compile(r"^gen_\w+$")


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package 'playwright' is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)"
    return None


_MISSING = _browser_missing()
if _MISSING and os.environ.get("CI"):
    # CI installs chromium; a skip there would hide that the browser test never ran.
    raise RuntimeError(f"browser test cannot run in CI: {_MISSING}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

if _MISSING is None:
    from playwright.sync_api import expect, sync_playwright
if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Route


@pytest.fixture(scope="module")
def web_stack() -> Iterator[Stack]:
    """One API process and one worker, with a fake model slow enough to watch (30 words/s)."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_FAKE_TPS": "30"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian chromium."""
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Pages:
    """Fresh browser contexts (one per person), each page checked for script errors at the end."""

    def __init__(self, browser: Browser, name: str):
        self.browser = browser
        self.name = name
        self.contexts: list[BrowserContext] = []
        self.errors: list[str] = []
        self.blocked: list[str] = []

    def new(self, url: str, offline: bool = False) -> Page:
        """A page in a fresh context; ``offline``: every request to a host other than
        127.0.0.1 is aborted (and listed in ``self.blocked``), as on a machine without internet."""
        context = self.browser.new_context(viewport={"width": 1100, "height": 900})
        self.contexts.append(context)
        if offline:
            context.route("**/*", self._local_only)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.goto(url)
        return page

    def _local_only(self, route: Route) -> None:
        url = route.request.url
        if url.startswith("data:") or urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def shot(self, page: Page, label: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{self.name}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Pages]:
    """Pages for one test; fails the test if any page threw a script error."""
    p = Pages(browser, request.node.name)
    yield p
    p.close()
    assert not p.errors, f"script errors on the page: {p.errors}"


def start(page: Page, prompt: str, model: str, max_tokens: int | None = None) -> str:
    """Send a prompt from the page; the generation id it shows."""
    page.fill("#prompt", prompt)
    page.fill("#model", model)
    page.fill("#max-tokens", str(max_tokens) if max_tokens else "")
    page.click("#send")
    expect(page.locator("#gen-id")).to_have_text(_GEN_ID)
    return page.locator("#gen-id").text_content() or ""


def tokens_on(page: Page) -> int:
    text = page.locator("#tokens").text_content() or "0"
    return int(text.split()[0])


def text_on(page: Page) -> str:
    return page.locator("#output").text_content() or ""


def finished(page: Page, status_value: str) -> None:
    expect(page.locator("#status")).to_have_attribute("data-status", status_value)
    expect(page.locator("#conn")).to_have_attribute("data-state", "ended")


def test_tokens_stream_in_and_match_the_status(web_stack: Stack, pages: Pages) -> None:
    """Tokens appear one by one while running, and the final text equals the status content."""
    page = pages.new(web_stack.url + "/")
    gen_id = start(page, "hello", "fake:lorem", max_tokens=60)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    wait_for(lambda: tokens_on(page) >= 3, 20, what="first tokens on the page")
    partial = text_on(page)
    assert page.locator("#status").get_attribute("data-status") == "running"
    pages.shot(page, "streaming")

    finished(page, "completed")
    final = status(web_stack.url, gen_id)
    assert final["status"] == "completed"
    assert text_on(page) == final["content"]
    assert final["content"].startswith(partial) and len(partial) < len(final["content"])
    expect(page.locator("#tokens")).to_contain_text("60 (prompt")
    expect(page.locator("#ttft")).to_have_text(re.compile(r"^\d+(\.\d+)? m?s$"))
    pages.shot(page, "completed")


def test_model_output_is_shown_as_text_never_markup(web_stack: Stack, pages: Pages) -> None:
    """HTML in the model's answer is displayed literally; no element is created from it."""
    page = pages.new(web_stack.url + "/")
    prompt = 'look <b>bold</b> <img src=x onerror="document.title=1"> & done'
    gen_id = start(page, prompt, "fake:echo")
    finished(page, "completed")
    content = status(web_stack.url, gen_id)["content"]
    assert "<img" in content
    assert text_on(page) == content
    assert page.locator("#output *").count() == 0
    assert page.title() == "tokenrelay"


def test_share_link_shows_the_same_text_live(web_stack: Stack, pages: Pages) -> None:
    """A second person opening the share link follows the generation live, read-only."""
    owner = pages.new(web_stack.url + "/")
    gen_id = start(owner, "share me", "fake:lorem", max_tokens=150)
    link = owner.locator("#share-link").get_attribute("href") or ""
    assert f"view={gen_id}" in link and "token=" in link

    viewer = pages.new(link)
    expect(viewer.locator("#viewer-note")).to_be_visible()
    expect(viewer.locator("#composer")).to_be_hidden()
    expect(viewer.locator("#cancel")).to_be_hidden()
    expect(viewer.locator("#gen-id")).to_have_text(gen_id)
    # Live, not a replay of a finished answer: text arrives while the owner still sees it running.
    wait_for(lambda: tokens_on(viewer) >= 3, 20, what="tokens on the viewer page")
    assert owner.locator("#status").get_attribute("data-status") == "running"
    expect(viewer.locator("#conn")).to_have_attribute("data-state", "live")
    pages.shot(viewer, "viewer-live")

    finished(owner, "completed")
    finished(viewer, "completed")
    content = status(web_stack.url, gen_id)["content"]
    assert text_on(owner) == content
    assert text_on(viewer) == content
    expect(viewer.locator("#run-model")).to_have_text("fake:lorem")
    pages.shot(viewer, "viewer-completed")


def test_page_resumes_after_its_api_process_restarts(web_stack: Stack, pages: Pages) -> None:
    """Kill the API the page streams from, start it again on the same port: the page resumes
    (the browser's own reconnection, with Last-Event-ID) and ends with the full text, once."""
    page = pages.new(web_stack.url + "/")
    gen_id = start(page, "Keep streaming while I restart the server", "fake:lorem",
                   max_tokens=600)
    wait_for(lambda: tokens_on(page) >= 10, 20, what="tokens before the restart")

    port = web_stack.ports[0]
    web_stack.apis[0].kill()
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    before = text_on(page)
    web_stack.add_api(port=port)
    web_stack.wait_ready(web_stack.url)

    expect(page.locator("#conn")).to_have_attribute("data-state", "resumed")
    assert page.locator("#status").get_attribute("data-status") == "running"
    path = pages.shot(page, "resumed")
    if os.environ.get("TOKENRELAY_DOCS_SCREENSHOTS"):
        shutil.copyfile(path, DOCS_SHOT)
    finished(page, "completed")

    final = status(web_stack.url, gen_id)
    assert final["status"] == "completed"
    assert text_on(page) == final["content"]
    assert final["content"].startswith(before)
    assert page.locator("#output").get_attribute("data-dupes") == "0"
    conn = page.locator("#conn")
    assert conn.get_attribute("data-drops") == "1"
    assert conn.get_attribute("data-reopens") == "0", "the page, not the browser, reconnected"
    expect(conn).to_contain_text("resumed after 1 drop")
    pages.shot(page, "completed")


def test_reload_brings_back_the_generation(web_stack: Stack, pages: Pages) -> None:
    """Reloading the page mid-stream replays the generation and follows it to the end."""
    page = pages.new(web_stack.url + "/")
    gen_id = start(page, "reload me", "fake:lorem", max_tokens=90)
    wait_for(lambda: tokens_on(page) >= 3, 20, what="tokens before the reload")
    page.reload()
    expect(page.locator("#gen-id")).to_have_text(gen_id)
    finished(page, "completed")
    assert text_on(page) == status(web_stack.url, gen_id)["content"]


def test_cancel_stops_the_generation(web_stack: Stack, pages: Pages) -> None:
    """Cancel mid-stream: the stream ends cancelled, and the page keeps exactly the text sent."""
    page = pages.new(web_stack.url + "/")
    gen_id = start(page, "stop me", "fake:lorem", max_tokens=1000)
    wait_for(lambda: tokens_on(page) >= 5, 20, what="tokens before cancel")
    page.click("#cancel")
    finished(page, "cancelled")
    expect(page.locator("#cancel")).to_be_hidden()
    final = status(web_stack.url, gen_id)
    assert final["status"] == "cancelled"
    assert text_on(page) == final["content"]
    assert tokens_on(page) < 1000
    pages.shot(page, "cancelled")


def test_share_link_to_an_unknown_generation_says_so(web_stack: Stack, pages: Pages) -> None:
    """A viewer link to a generation that does not exist (or expired) ends with a clear message,
    not endless reconnecting."""
    page = pages.new(f"{web_stack.url}/?view=gen_{'0' * 32}&token=nope")
    expect(page.locator("#status")).to_have_attribute("data-status", "unavailable")
    expect(page.locator("#run-error")).to_contain_text("not_found")
    expect(page.locator("#conn")).to_have_attribute("data-state", "ended")


# ---- the first five minutes: /docs offline, and what the page got wrong ------------------------


def test_docs_render_without_internet(web_stack: Stack, pages: Pages) -> None:
    """/docs shows the API's operations with every request to another host aborted: its
    Swagger UI comes from the server itself, not from a CDN."""
    page = pages.new(web_stack.url + "/docs", offline=True)
    operations = page.locator(".opblock-summary-path")
    expect(operations.first).to_be_visible()
    paths = operations.all_text_contents()
    assert any("/v1/generations" in p for p in paths), paths
    assert not pages.blocked, pages.blocked
    pages.shot(page, "docs")


def test_redoc_renders_without_internet(web_stack: Stack, pages: Pages) -> None:
    """/redoc too: its script is served locally, and it asks for no web font."""
    page = pages.new(web_stack.url + "/redoc", offline=True)
    expect(page.get_by_text("/v1/generations/{gen_id}/events").first).to_be_attached()
    assert not pages.blocked, pages.blocked


def test_a_failed_generation_is_not_a_dropped_connection(web_stack: Stack, pages: Pages) -> None:
    """The stream's own `error` event ends it as failed; it is not counted as a drop."""
    page = pages.new(web_stack.url + "/")
    start(page, "fail please", "fake:error")
    finished(page, "failed")
    expect(page.locator("#run-error")).to_contain_text("upstream_error")
    conn = page.locator("#conn")
    assert conn.get_attribute("data-drops") == "0"
    assert "drop" not in (conn.text_content() or "")


def test_a_failed_create_clears_the_previous_answer(web_stack: Stack, pages: Pages) -> None:
    """A create the server refuses shows its error alone, not under the previous answer."""
    page = pages.new(web_stack.url + "/")
    start(page, "first answer", "fake:echo")
    finished(page, "completed")
    page.fill("#model", "nope:x")
    page.click("#send")
    expect(page.locator("#form-error")).to_contain_text("unknown_model")
    expect(page.locator("#run")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    page.reload()  # and a reload does not bring the old answer back either
    expect(page.locator("#composer")).to_be_visible()
    expect(page.locator("#run")).to_be_hidden()


def test_send_is_disabled_until_the_answer_ends(web_stack: Stack, pages: Pages) -> None:
    """While an answer streams Send is disabled (a second click cannot start a second
    generation); it comes back at the terminal event."""
    page = pages.new(web_stack.url + "/")
    start(page, "long", "fake:lorem", max_tokens=1000)
    wait_for(lambda: tokens_on(page) >= 3, 20, what="first tokens on the page")
    expect(page.locator("#send")).to_be_disabled()
    page.press("#max-tokens", "Enter")  # implicit submission does not start one either
    page.click("#cancel")
    finished(page, "cancelled")
    expect(page.locator("#send")).to_be_enabled()


@pytest.fixture(scope="module")
def configured_stack() -> Iterator[Stack]:
    """A deployment with its own default model and a configured `openai:` model list."""
    s = Stack(apis=1, workers=1, env={
        "TOKENRELAY_DEFAULT_MODEL": "fake:lorem",
        "TOKENRELAY_OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # never called here
        "TOKENRELAY_OPENAI_MODELS": "house-model",
        "TOKENRELAY_FAKE_TPS": "200",
    })
    yield s
    s.stop()


def test_model_field_offers_the_servers_models_and_default(configured_stack: Stack,
                                                           pages: Pages) -> None:
    """The model field starts at the server's default model and suggests what /v1/models lists;
    sending without touching it runs that default."""
    listed = [m["id"] for m in httpx.get(f"{configured_stack.url}/v1/models").json()["data"]]
    assert "fake:lorem" in listed
    page = pages.new(configured_stack.url + "/")
    expect(page.locator("#models")).to_have_attribute("data-source", "server")
    options = page.locator("#models option")
    assert [o.get_attribute("value") for o in options.all()] == listed
    expect(page.locator("#model")).to_have_value("fake:lorem")
    page.fill("#prompt", "anything")
    page.fill("#max-tokens", "7")
    page.click("#send")
    finished(page, "completed")
    expect(page.locator("#run-model")).to_have_text("fake:lorem")
    assert len(text_on(page).split()) == 7
