"""``tokenrelay chat --thread``, the interactive ``chat`` and ``tokenrelay threads``, run as a
person runs them (real processes, a pseudo-terminal), against a stack whose upstream is a
local OpenAI-compatible server that records what it was sent."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cli.terminal import Cli, run
from tests.fake_upstream import Record, fake_upstream
from tests.stack import Stack, wait_for
from tests.test_cli import CuttingProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Stack, Record]]:
    with fake_upstream() as (base_url, record):
        s = Stack(apis=1, workers=1, env={"TOKENRELAY_OPENAI_BASE_URL": base_url,
                                          "TOKENRELAY_OPENAI_API_KEY": "test-key"})
        try:
            yield s, record
        finally:
            s.stop()


def plain(text: str) -> str:
    """What a terminal shows, less colour and cursor codes."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def thread(url: str, thread_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/threads/{thread_id}", timeout=10)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def settled(url: str, thread_id: str, messages: int) -> dict[str, Any]:
    """The thread once it has ``messages`` messages and no answer is running."""
    return wait_for(lambda: (t := thread(url, thread_id))["active_generation_id"] is None
                    and len(t["messages"]) == messages and t, 20, 0.05,
                    f"{thread_id} with {messages} messages, idle")


def test_chat_thread_continues_and_threads_lists_it(env: tuple[Stack, Record]) -> None:
    """Two `chat --thread` turns: each prints its answer, the upstream got the history,
    the thread holds both turns, and `tokenrelay threads` lists it with its count."""
    stack, record = env
    made = httpx.post(f"{stack.url}/v1/threads", timeout=10,
                      json={"system": "Be brief.", "model": "openai:cli-thread"})
    assert made.status_code == 201, made.text
    thread_id = made.json()["id"]

    first = run("chat", "--thread", thread_id, "first words here", "--url", stack.url)
    assert first.popen.returncode == 0, first.err.text
    assert first.stdout == "first words here"
    second = run("chat", "--thread", thread_id, "and a second turn", "--url", stack.url)
    assert second.popen.returncode == 0, second.err.text
    assert second.stdout == "and a second turn"
    assert second.err.text.strip().splitlines()[-1].startswith("[completed · stop")

    t = settled(stack.url, thread_id, 4)
    assert [(m["role"], m["content"]) for m in t["messages"]] == [
        ("user", "first words here"), ("assistant", "first words here"),
        ("user", "and a second turn"), ("assistant", "and a second turn")]
    sent = [r["messages"] for r in record.requests if r["model"] == "cli-thread"]
    assert sent[-1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first words here"},
        {"role": "assistant", "content": "first words here"},
        {"role": "user", "content": "and a second turn"}]

    piped = run("chat", "--thread", thread_id, "-", "--url", stack.url, stdin=b"a third\n")
    assert piped.popen.returncode == 0, piped.err.text
    assert piped.stdout == "a third"
    settled(stack.url, thread_id, 6)

    listed = run("threads", "--url", stack.url)
    assert listed.popen.returncode == 0, listed.err.text
    row = next((line for line in listed.out.text.splitlines() if thread_id in line), None)
    assert row is not None, listed.out.text
    assert re.search(r"first words here\s+just now\s+6\s*$", row), row
    as_json = run("threads", "--json", "--url", stack.url)
    entry = next(t for t in json.loads(as_json.out.text)["data"]
                 if t["id"] == thread_id)
    assert entry["message_count"] == 6

    unknown = run("chat", "--thread", "thr_" + "0" * 24, "x", "--url", stack.url)
    assert unknown.popen.returncode == 2
    assert "not_found" in unknown.err.text


def test_interactive_session_two_turns_ctrl_c_and_exit(env: tuple[Stack, Record]) -> None:
    """`tokenrelay chat` on a terminal: a new thread, two turns typed at the prompt, the
    second answered with the first as history; /exit quits and says how
    to continue."""
    stack, record = env
    cli = Cli("chat", "--url", stack.url, "--model", "openai:cli-live",
              tty=("stdin", "stdout", "stderr"))
    try:
        cli.wait_until(lambda c: re.search(r"thr_[0-9a-f]{32}", c.err.text), "the thread id")
        found = re.search(r"(thr_[0-9a-f]{32})", cli.err.text)
        assert found
        thread_id = found.group(1)
        cli.type("hello over there\n")
        settled(stack.url, thread_id, 2)
        cli.wait_until(lambda c: "hello over there" in c.out.text, "the first answer")
        cli.type("second question now\n")
        settled(stack.url, thread_id, 4)
        cli.wait_until(lambda c: "second question now" in c.out.text, "the answer")
        cli.type("/exit\n")
        assert cli.wait(20) == 0
    finally:
        cli.kill()
    assert f"continue it: tokenrelay chat --thread {thread_id}" in plain(cli.err.text)
    t = thread(stack.url, thread_id)
    assert [(m["role"], m["content"]) for m in t["messages"]] == [
        ("user", "hello over there"), ("assistant", "hello over there"),
        ("user", "second question now"), ("assistant", "second question now")]
    sent = [r["messages"] for r in record.requests if r["model"] == "cli-live"]
    assert [m["content"] for m in sent[1]] == [
        "hello over there", "hello over there", "second question now"]


def test_interactive_ctrl_c_cancels_the_answer_and_returns_to_the_prompt(
        env: tuple[Stack, Record]) -> None:
    """Ctrl-C while an answer streams cancels it (partial text kept) and the session goes
    on: the next message is answered in the same thread."""
    stack, _ = env
    made = httpx.post(f"{stack.url}/v1/threads", json={"model": "openai:slow"}, timeout=10)
    thread_id = made.json()["id"]
    cli = Cli("chat", "--thread", thread_id, "--url", stack.url,
              tty=("stdin", "stdout", "stderr"))
    try:
        cli.wait_until(lambda c: thread_id in c.err.text, "the session to start")
        cli.type("go slowly\n")
        cli.wait_until(lambda c: "w3 " in c.out.text, "the slow answer's first words")
        cli.popen.send_signal(signal.SIGINT)
        cli.wait_until(lambda c: "[stopped: cancelled]" in c.err.text, "the cancel notice")
        t = settled(stack.url, thread_id, 2)
        assert t["messages"][1]["status"] == "cancelled"
        assert t["messages"][1]["content"].startswith("w0 w1 w2 w3 ")
        cli.type("again please\n")
        wait_for(lambda: (m := thread(stack.url, thread_id)["messages"])[3:]
                 and m[3]["content"].startswith("w0 w1"), 20, what="the next answer streaming")
        cli.popen.send_signal(signal.SIGINT)  # stop the second slow answer too
        cli.wait_until(lambda c: c.err.text.count("[stopped: cancelled]") == 2, "second stop")
        cli.type("\x04")  # Ctrl-D
        assert cli.wait(20) == 0
    finally:
        cli.kill()
    assert f"continue it: tokenrelay chat --thread {thread_id}" in plain(cli.err.text)


def test_a_post_whose_answer_was_lost_is_not_sent_twice(env: tuple[Stack, Record]) -> None:
    """The connection breaks inside the answer's headers: `chat --thread` finds its message
    in the thread and follows that answer, rather than posting the message again."""
    stack, _ = env
    made = httpx.post(f"{stack.url}/v1/threads", json={"model": "fake:echo"}, timeout=10)
    thread_id = made.json()["id"]
    # How many bytes the CLI's first request (GET the thread) gets back, measured through
    # a proxy that cuts nothing: the cut below falls inside the POST's answer headers.
    measure = CuttingProxy(stack.ports[0], [])
    try:
        assert httpx.get(f"{measure.url}/v1/threads/{thread_id}").status_code == 200
        wait_for(lambda: measure.responses and measure.responses[0].endswith(b"}"), 10,
                 what="the measured answer")
        got = len(measure.responses[0])
    finally:
        measure.close()
    proxy = CuttingProxy(stack.ports[0], [got + 20])
    try:
        cli = run("chat", "--thread", thread_id, "said once only", "--url", proxy.url)
    finally:
        proxy.close()
    assert cli.popen.returncode == 0, cli.err.text
    assert cli.stdout == "said once only"
    assert proxy.cut_count == 1
    assert b"POST /v1/threads/" in proxy.requests[0]
    assert re.search(rb"(?i)x-generation-id: gen_", proxy.dropped[0])  # the server answered
    t = settled(stack.url, thread_id, 2)  # one question and its answer: not two questions
    assert [m["content"] for m in t["messages"]] == ["said once only", "said once only"]
    assert sum(b"POST /v1/threads/" in r for r in proxy.requests) == 1


def test_chat_thread_resumes_a_stream_cut_mid_answer(env: tuple[Stack, Record]) -> None:
    """The connection breaks in the middle of the answer: `chat --thread` reconnects with
    Last-Event-ID and prints the answer exactly once."""
    stack, _ = env
    made = httpx.post(f"{stack.url}/v1/threads", json={"model": "fake:echo"}, timeout=10)
    thread_id = made.json()["id"]
    prompt = " ".join(f"w{i}" for i in range(150))
    proxy = CuttingProxy(stack.ports[0], [3000])  # past the GET, inside the event stream
    try:
        cli = run("chat", "--thread", thread_id, prompt, "--url", proxy.url)
    finally:
        proxy.close()
    assert cli.popen.returncode == 0, cli.err.text
    assert proxy.cut_count == 1 and b"event: delta" in proxy.responses[0]
    assert any(b"last-event-id: " in r.lower() for r in proxy.requests[1:])
    assert cli.stdout == prompt
    t = settled(stack.url, thread_id, 2)
    assert t["messages"][1]["content"] == prompt


def test_interactive_on_a_thread_shows_history_and_follows_its_answer(
        env: tuple[Stack, Record]) -> None:
    """`chat --thread ID` on a terminal while an answer is being written (from elsewhere):
    the history is printed, the answer is followed live from its first word."""
    stack, _ = env
    made = httpx.post(f"{stack.url}/v1/threads", json={"model": "openai:slow"}, timeout=10)
    thread_id = made.json()["id"]
    posted = httpx.post(f"{stack.url}/v1/threads/{thread_id}/messages",
                        json={"content": "from another device"}, timeout=10)
    assert posted.status_code == 202, posted.text
    cli = Cli("chat", "--thread", thread_id, "--url", stack.url,
              tty=("stdin", "stdout", "stderr"))
    try:
        cli.wait_until(lambda c: "w2 " in c.out.text, "the answer in flight")
        cli.popen.send_signal(signal.SIGINT)
        cli.wait_until(lambda c: "[stopped: cancelled]" in c.err.text, "the cancel notice")
        cli.type("\x04")
        assert cli.wait(20) == 0
    finally:
        cli.kill()
    shown = plain(cli.out.text).replace("\r\n", "\n")
    assert "› from another device\nw0 w1 w2 " in shown, shown
    t = settled(stack.url, thread_id, 2)
    assert t["messages"][1]["status"] == "cancelled"
