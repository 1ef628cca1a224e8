"""The chat page at ``/`` in a real browser (tests/browser.py), against one stack with API keys
on. Screenshots go to build/screenshots/; with TOKENRELAY_DOCS_SCREENSHOTS=1 the one used in
the README is also written to docs/screenshot-web.png.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, MISSING, TIMEOUT_MS, Pages
from tests.chatpage import (
    AUTH,
    KEY,
    LAST_ANSWER,
    WITH_KEY,
    finished,
    kill_page_api,
    restart_page_api,
    send,
    stored_answer,
    text_in,
    thread,
    thread_id,
    tokens_in,
)
from tests.client import create, status
from tests.stack import ROOT, Stack, wait_for

DOCS_SHOT = ROOT / "docs" / "screenshot-web.png"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

if MISSING is None:
    from playwright.sync_api import expect, sync_playwright
if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture(scope="module")
def web_stack() -> Iterator[Stack]:
    """Two API processes (pages use the first; the second serves while it is down) and a
    worker, auth on, a fake model slow enough to watch (30 words/s), its own default model and a
    configured `openai:` model list (never called here)."""
    s = Stack(apis=2, workers=1, env={
        "TOKENRELAY_API_KEYS": f"acme:{KEY}",
        "TOKENRELAY_FAKE_TPS": "30",
        "TOKENRELAY_DEFAULT_MODEL": "fake:lorem",
        "TOKENRELAY_OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "TOKENRELAY_OPENAI_MODELS": "house-model",
    })
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


@pytest.fixture
def pages(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Pages]:
    """Pages for one test; fails the test if any page threw a script error."""
    p = Pages(browser, request.node.name)
    yield p
    p.close()
    assert not p.errors, f"script errors on the page: {p.errors}"


def test_a_message_streams_into_a_bubble_and_is_the_threads_answer(web_stack: Stack,
                                                                    pages: Pages) -> None:
    """Tokens appear one by one while running, the final text equals the thread's stored answer,
    the new thread heads the list, and the page asks nothing of another host."""
    page = pages.new(web_stack.url + "/", offline=True, init_script=WITH_KEY)
    answer = send(page, "hello", "fake:lorem", max_tokens=60)
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    wait_for(lambda: tokens_in(answer) >= 3, 20, what="first tokens on the page")
    partial = text_in(answer)
    assert answer.get_attribute("data-status") == "running"
    pages.shot(page, "streaming")

    finished(page, answer, "completed")
    tid = thread_id(page)
    stored = stored_answer(web_stack.url, tid, answer.get_attribute("data-gen") or "")
    assert stored["status"] == "completed"
    assert text_in(answer) == stored["content"]
    assert stored["content"].startswith(partial) and len(partial) < len(stored["content"])
    expect(answer.locator(".tokens")).to_have_text("60 tokens (prompt 1)")
    expect(answer.locator(".ttft")).to_have_text(re.compile(r"^first token \d+(\.\d+)? m?s$"))
    expect(page.locator(".msg[data-role=user]")).to_have_text(["hello"])
    expect(page.locator("#thread-list .thread").first).to_have_attribute("data-id", tid)
    assert not pages.blocked, pages.blocked


def test_markdown_is_drawn_and_markup_stays_text(web_stack: Stack, pages: Pages) -> None:
    """An answer's code block, inline code, emphasis and safe links become elements; HTML in
    the prompt and the answer, and a javascript: link, never do."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    prompt = ("Try `ls` and **this**:\n```sh\necho '<b>hi</b>'\n```\n"
              '<img src=x onerror="document.title=1"> <script>document.title=2</script> '
              "[docs](https://example.com/d) [bad](javascript:document.title=3)")
    answer = send(page, prompt, "fake:echo")
    finished(page, answer, "completed")
    md = answer.locator(".body")
    expect(md.locator("pre code[data-lang=sh]")).to_have_text("echo '<b>hi</b>'")
    expect(md.locator("p code")).to_have_text("ls")
    expect(md.locator("strong")).to_have_text("this")
    expect(md.locator("a")).to_have_attribute("href", "https://example.com/d")
    assert md.locator("a").count() == 1, "the javascript: link is not a link"
    expect(md).to_contain_text('<img src=x onerror="document.title=1">')
    expect(page.locator(".msg[data-role=user]")).to_contain_text("<script>document.title=2")
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.title() != "1" and page.title() != "2" and page.title() != "3"
    stored = stored_answer(web_stack.url, thread_id(page), answer.get_attribute("data-gen") or "")
    assert text_in(answer) == stored["content"]


_UNSAFE = '<span class="unsafe-link" title="link not followed (only http, https and mailto links are)">'
_A = '<a href="{}" target="_blank" rel="noopener noreferrer nofollow">'
MARKDOWN = {
    "[a](javascript:alert%281%29) [b](JaVaScRiPt:x) [c](data:text/html,x) [d](//evil.example/) "
    "<javascript:x>":
        f"<p>{_UNSAFE}a</span> {_UNSAFE}b</span> {_UNSAFE}c</span> {_UNSAFE}d</span> "
        "&lt;javascript:x&gt;</p>",
    "[ok](https://ok.example/x?y=1&z=2) <https://a.example> see https://b.example/p.":
        f"<p>{_A.format('https://ok.example/x?y=1&amp;z=2')}ok</a> "
        f"{_A.format('https://a.example/')}https://a.example</a> "
        f"see {_A.format('https://b.example/p')}https://b.example/p</a>.</p>",
    "![pic](https://x.example/y.png)": f"<p>{_A.format('https://x.example/y.png')}pic</a></p>",
    "```js\nlet a = '<b>';": "<pre><code data-lang=\"js\">let a = '&lt;b&gt;';</code></pre>",
    "a_b_c and *a **b** c*": "<p>a_b_c and <em>a <strong>b</strong> c</em></p>",
    "<b>x</b> &amp; <script>alert(1)</script>":
        "<p>&lt;b&gt;x&lt;/b&gt; &amp;amp; &lt;script&gt;alert(1)&lt;/script&gt;</p>",
    "# Title\n- one\n- `two`\n\n3. three\n4. four\n> quoted *text*\n\n---\nline one\nline two":
        "<h3>Title</h3><ul><li>one</li><li><code>two</code></li></ul>"
        '<ol start="3"><li>three</li><li>four</li></ol>'
        "<blockquote><p>quoted <em>text</em></p></blockquote><hr><p>line one<br>line two</p>",
    "``code with ` tick`` and \\*not em\\*": "<p><code>code with ` tick</code> and *not em*</p>",
    "| a | b \\| c | d |\n|:--|:-:|--:|\n| 1 | **2** | 3 |\n\nafter":
        '<div class="table"><table><thead><tr><th>a</th><th class="align-center">b | c</th>'
        '<th class="align-right">d</th></tr></thead><tbody><tr><td>1</td><td class="align-'
        'center"><strong>2</strong></td><td class="align-right">3</td></tr></tbody></table>'
        "</div><p>after</p>",
}


def test_markdown_module_builds_only_safe_elements(web_stack: Stack, pages: Pages) -> None:
    """markdown.js on the cases that matter: unsafe link schemes and relative links are not
    links, images are links (no remote load), markup is text, an unclosed fence is code."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    drawn = page.evaluate("""async (cases) => {
      const { renderMarkdown } = await import("/static/markdown.js");
      return cases.map((c) => {
        const box = document.createElement("div");
        box.append(renderMarkdown(c));
        return box.innerHTML;
      });
    }""", list(MARKDOWN))
    assert dict(zip(MARKDOWN, drawn, strict=True)) == MARKDOWN


def test_reload_mid_answer_restores_the_thread_and_resumes(web_stack: Stack,
                                                           pages: Pages) -> None:
    """Reload in the middle of the second answer: the history comes back, the answer goes on
    from where the page was (?after=, no replay), and ends as the thread stored it, once."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    first = send(page, "one", "fake:echo")
    finished(page, first, "completed")
    answer = send(page, "two", "fake:lorem", max_tokens=150)
    wait_for(lambda: tokens_in(answer) >= 10, 20, what="tokens before the reload")
    gen_id = answer.get_attribute("data-gen") or ""
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/stream?" in r.url else None)
    page.reload()

    expect(page.locator(".msg[data-role=user]")).to_have_text(["one", "two"])
    expect(page.locator(".msg[data-role=assistant]").first).to_have_attribute("data-text", "one")
    resumed = page.locator(f".msg[data-role=assistant][data-gen={gen_id}]")
    expect(resumed).to_have_attribute("data-status", "running")
    finished(page, resumed, "completed")
    stored = stored_answer(web_stack.url, thread_id(page), gen_id)
    assert text_in(resumed) == stored["content"]
    assert len(stored["content"].split()) == 150
    assert resumed.get_attribute("data-dupes") == "0"
    assert streams and all("after=" in url for url in streams), streams
    expect(page.locator(".msg")).to_have_count(4)


def test_stop_cancels_the_answer(web_stack: Stack, pages: Pages) -> None:
    """Stop mid-answer: it ends cancelled, the page keeps exactly the text the thread keeps,
    and Send comes back."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    answer = send(page, "stop me", "fake:lorem", max_tokens=1000)
    wait_for(lambda: tokens_in(answer) >= 5, 20, what="tokens before stop")
    page.click("#stop")
    finished(page, answer, "cancelled")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    stored = stored_answer(web_stack.url, thread_id(page), answer.get_attribute("data-gen") or "")
    assert stored["status"] == "cancelled"
    assert text_in(answer) == stored["content"]
    assert 5 <= tokens_in(answer) < 1000


def test_share_link_is_a_live_read_only_view_of_the_thread(web_stack: Stack,
                                                           pages: Pages) -> None:
    """Someone without a key opens the share link: the thread so far, the answer live, then the
    next message as it is sent; nothing to type into."""
    owner = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    answer = send(owner, "share me", "fake:lorem", max_tokens=150)
    link = owner.locator("#share-link").get_attribute("href") or ""
    query = parse_qs(urlsplit(link).query)
    assert query["view"] == [thread_id(owner)] and query["token"]

    viewer = pages.new(link)
    expect(viewer.locator("#viewer-note")).to_be_visible()
    for hidden in ("#composer", "#sidebar", "#stop", "#share"):
        expect(viewer.locator(hidden)).to_be_hidden()
    live = viewer.locator(LAST_ANSWER)
    # Live, not a replay of a finished answer: text arrives while the owner still sees it running.
    wait_for(lambda: tokens_in(live) >= 3, 20, what="tokens on the viewer page")
    assert answer.get_attribute("data-status") == "running"
    expect(viewer.locator("#conn")).to_have_attribute("data-state", "live")
    pages.shot(viewer, "viewer-live")
    finished(owner, answer, "completed")
    finished(viewer, live, "completed")
    assert text_in(live) == text_in(answer)

    following = send(owner, "and the next one", "fake:echo")
    expect(viewer.locator(".msg[data-role=user]")).to_have_text(["share me", "and the next one"])
    finished(owner, following, "completed")
    expect(viewer.locator(LAST_ANSWER)).to_have_attribute("data-text", "and the next one")


def test_a_generations_share_link_is_a_live_view_of_that_answer(web_stack: Stack,
                                                                pages: Pages) -> None:
    """`/?view=gen_…&token=…` (a generation's id and stream token) follows that one answer."""
    gen = create(web_stack.url, headers=AUTH, model="fake:lorem", prompt="x", max_tokens=40)
    page = pages.new(f"{web_stack.url}/?view={gen['id']}&token={gen['stream_token']}")
    answer = page.locator(LAST_ANSWER)
    finished(page, answer, "completed")
    assert text_in(answer) == status(web_stack.url, gen["id"], headers=AUTH)["content"]
    expect(answer.locator(".model")).to_have_text("fake:lorem")
    expect(page.locator("#composer")).to_be_hidden()


def test_page_resumes_after_its_api_process_restarts(web_stack: Stack, pages: Pages) -> None:
    """Kill the API the page streams from, start it again on the same port: the page resumes
    (the browser's own reconnection, with Last-Event-ID) and ends with the full text, once."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    first = send(page, "A shell loop, **briefly**:\n```sh\nfor f in *.md; do wc -l \"$f\"; done\n"
                       "```\nThen `sort -n` it.", "fake:echo")
    finished(page, first, "completed")
    answer = send(page, "Keep streaming while I restart the server", "fake:lorem",
                  max_tokens=600)
    wait_for(lambda: tokens_in(answer) >= 10, 20, what="tokens before the restart")

    port = kill_page_api(web_stack)
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    before = text_in(answer)
    restart_page_api(web_stack, port)

    expect(page.locator("#conn")).to_have_attribute("data-state", "resumed")
    assert answer.get_attribute("data-status") == "running"
    page.eval_on_selector("#messages", "box => { box.scrollTop = 0; }")  # the whole exchange
    path = pages.shot(page, "resumed")
    if os.environ.get("TOKENRELAY_DOCS_SCREENSHOTS"):
        shutil.copyfile(path, DOCS_SHOT)
    finished(page, answer, "completed")

    stored = stored_answer(web_stack.url, thread_id(page), answer.get_attribute("data-gen") or "")
    assert text_in(answer) == stored["content"] and stored["content"].startswith(before)
    assert answer.get_attribute("data-dupes") == "0"
    conn = page.locator("#conn")
    assert conn.get_attribute("data-drops") == "1"
    assert conn.get_attribute("data-reopens") == "0", "the page, not the browser, reconnected"
    expect(conn).to_contain_text("resumed after 1 drop")


def test_an_answer_that_took_over_while_the_page_was_away_gets_its_own_bubble(
        web_stack: Stack, pages: Pages) -> None:
    """While the page's API is down, another client's enqueued message takes the thread over
    (the answer the page followed is cancelled). The page's reconnect lands on the new answer:
    the first ends as the thread stored it, the new one is drawn in its own bubble."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    first = send(page, "first", "fake:lorem", max_tokens=1000)
    wait_for(lambda: tokens_in(first) >= 5, 20, what="tokens of the first answer")
    tid, first_id = thread_id(page), first.get_attribute("data-gen") or ""
    other = web_stack.urls[1]
    queued = httpx.post(f"{other}/v1/threads/{tid}/messages", headers=AUTH, json={
        "content": "from elsewhere", "model": "fake:lorem", "max_tokens": 150,
        "if_busy": "enqueue"}).json()

    port = kill_page_api(web_stack)
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting")
    assert httpx.post(f"{other}/v1/generations/{first_id}/cancel",
                      headers=AUTH).status_code == 202
    wait_for(lambda: thread(other, tid)["active_generation_id"] == queued["id"], 10,
             what="the enqueued answer to take over")
    restart_page_api(web_stack, port)

    taken_over = page.locator(f".msg[data-role=assistant][data-gen={queued['id']}]")
    finished(page, taken_over, "completed")
    expect(first).to_have_attribute("data-status", "cancelled")
    assert text_in(first) == stored_answer(other, tid, first_id)["content"]
    assert text_in(taken_over) == stored_answer(other, tid, queued["id"])["content"]
    expect(page.locator(".msg[data-role=user]")).to_have_text(["first", "from elsewhere"])


def test_a_share_link_that_reads_nothing_says_so(web_stack: Stack, pages: Pages) -> None:
    """A link to an unknown thread or answer, or with a bad token, ends with a clear message,
    not endless reconnecting."""
    for view in (f"thr_{'0' * 32}", f"gen_{'0' * 32}"):
        page = pages.new(f"{web_stack.url}/?view={view}&token=nope")
        expect(page.locator("#page-error")).to_contain_text("invalid or expired stream token")
        expect(page.locator("#conn")).to_have_attribute("data-state", "ended")


def test_docs_render_without_internet(web_stack: Stack, pages: Pages) -> None:
    """/docs shows the API's operations with every request to another host aborted: its
    Swagger UI comes from the server itself, not from a CDN."""
    page = pages.new(web_stack.url + "/docs", offline=True)
    operations = page.locator(".opblock-summary-path")
    expect(operations.first).to_be_visible()
    paths = operations.all_text_contents()
    assert any("/v1/generations" in p for p in paths), paths
    assert not pages.blocked, pages.blocked


def test_redoc_renders_without_internet(web_stack: Stack, pages: Pages) -> None:
    """/redoc too: its script is served locally, and it asks for no web font."""
    page = pages.new(web_stack.url + "/redoc", offline=True)
    expect(page.get_by_text("/v1/generations/{gen_id}/events").first).to_be_attached()
    assert not pages.blocked, pages.blocked


# ---- what the first page got wrong (issue 12 #8), kept fixed ------------------------------------


def test_a_failed_generation_is_not_a_dropped_connection(web_stack: Stack, pages: Pages) -> None:
    """The stream's own `error` event ends the answer as failed; it is not counted as a drop."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    answer = send(page, "fail please", "fake:error")
    finished(page, answer, "failed")
    expect(answer.locator(".error")).to_contain_text("upstream_error")
    conn = page.locator("#conn")
    assert conn.get_attribute("data-drops") == "0"
    assert "drop" not in (conn.text_content() or "")


def test_a_refused_message_leaves_nothing_behind(web_stack: Stack, pages: Pages) -> None:
    """A message the server refuses shows its error alone: no bubble in a thread, and in a new
    chat no thread at all (on the page, in the list, or on the server)."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    finished(page, send(page, "first answer", "fake:echo"), "completed")
    page.fill("#model", "nope:x")
    page.fill("#prompt", "refused")
    page.click("#send")
    expect(page.locator("#form-error")).to_contain_text("unknown_model")
    expect(page.locator(".msg")).to_have_count(2)
    expect(page.locator("#send")).to_be_enabled()

    listed = httpx.get(f"{web_stack.url}/v1/threads?limit=100", headers=AUTH).json()["data"]
    page.click("#new-chat")
    page.fill("#model", "nope:x")
    page.fill("#prompt", "refused too")
    page.click("#send")
    expect(page.locator("#form-error")).to_contain_text("unknown_model")
    expect(page.locator(".msg")).to_have_count(0)
    assert urlsplit(page.url).query == ""
    assert httpx.get(f"{web_stack.url}/v1/threads?limit=100", headers=AUTH).json()["data"] == listed
    page.reload()  # and a reload does not bring an answer back either
    expect(page.locator("#composer")).to_be_visible()
    expect(page.locator(".msg")).to_have_count(0)


def test_send_is_disabled_until_the_answer_ends(web_stack: Stack, pages: Pages) -> None:
    """While an answer streams Send is disabled, and Enter cannot start a second answer either;
    Send comes back at the terminal event."""
    page = pages.new(web_stack.url + "/", init_script=WITH_KEY)
    answer = send(page, "long", "fake:lorem", max_tokens=1000)
    wait_for(lambda: tokens_in(answer) >= 3, 20, what="first tokens on the page")
    expect(page.locator("#send")).to_be_disabled()
    page.fill("#prompt", "second")
    page.press("#prompt", "Enter")
    page.press("#max-tokens", "Enter")  # implicit submission
    page.click("#stop")
    finished(page, answer, "cancelled")
    expect(page.locator("#send")).to_be_enabled()
    users = [m for m in thread(web_stack.url, thread_id(page))["messages"] if m["role"] == "user"]
    assert [m["content"] for m in users] == ["long"]


def test_model_field_offers_the_servers_models_and_default(web_stack: Stack,
                                                           pages: Pages) -> None:
    """The model field starts at the server's default model and suggests what /v1/models lists
    once the user gave the key the server asks for; sending without touching it runs that
    default."""
    listed = [m["id"] for m in
              httpx.get(f"{web_stack.url}/v1/models", headers=AUTH).json()["data"]]
    assert "fake:lorem" in listed and any("house-model" in m for m in listed)
    page = pages.new(web_stack.url + "/")
    expect(page.locator("#auth")).to_have_attribute("open", "")  # 401: the page asks for a key
    assert page.locator("#models").get_attribute("data-source") is None
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#models")).to_have_attribute("data-source", "server")
    options = page.locator("#models option")
    assert [o.get_attribute("value") for o in options.all()] == listed
    expect(page.locator("#model")).to_have_value("fake:lorem")
    answer = send(page, "anything", None, max_tokens=7)
    finished(page, answer, "completed")
    expect(answer.locator(".model")).to_have_text("fake:lorem")
    assert len(text_in(answer).split()) == 7
