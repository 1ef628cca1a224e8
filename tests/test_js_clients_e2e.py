"""npm clients against a real stack (two API processes, two workers): the Vercel AI SDK's
chat transport and the ``eventsource`` package, run by node's test runner from tests/js/,
plus the AI SDK routes' bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.client import stored_generations
from tests.fake_upstream import fake_upstream
from tests.stack import Process, Stack, wait_for
from tests.test_failures_e2e import _running_worker_pid
from tokenrelay.api.ai_sdk import chat_thread_id
from tokenrelay.api.ui_stream import RESTARTED_TEXT
from tokenrelay.shared import keys

pytestmark = pytest.mark.slow  # starts real processes

JS = Path(__file__).resolve().parent / "js"
KEY = "k-acme"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def node() -> str:
    """node, with tests/js's locked packages installed (npm ci, redone when the lock changes)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed (.ci/run installs them with apt-get)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.skip(f"node {version.strip()} is too old: the eventsource package needs 20+")
    lock = hashlib.sha256((JS / "package-lock.json").read_bytes()).hexdigest()
    stamp = JS / "node_modules" / ".tokenrelay-lock"
    if not stamp.exists() or stamp.read_text() != lock:
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
        stamp.write_text(lock)
    return node


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Two APIs, two workers; bare model names go to the fake upstream (reasoning, tools)."""
    with fake_upstream() as (base_url, _):
        s = Stack(apis=2, workers=2, env={
            "TOKENRELAY_API_KEYS": f"acme:{KEY}",
            "TOKENRELAY_OPENAI_BASE_URL": base_url,
            "TOKENRELAY_OPENAI_API_KEY": "test-key",
            "TOKENRELAY_WORKER_GRACE_S": "1",  # a worker told to stop hands its answer over
        })
        try:
            yield s
        finally:
            s.stop()


def run_node(node: str, stack: Stack, test_file: str, **env: str) -> None:
    done = subprocess.run(
        [node, "--test", test_file], cwd=JS, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TR_API_URLS": ",".join(stack.urls), "TR_API_KEY": KEY, **env},
    )
    assert done.returncode == 0, f"node --test {test_file}:\n{done.stdout}\n{done.stderr}"


def test_ai_sdk_transport(node: str, stack: Stack) -> None:
    """DefaultChatTransport: sendMessages streams the thread's answer (reasoning and tool
    input parts too); reconnectToStream on the other process replays it whole, each part
    once, to finish; then 204."""
    run_node(node, stack, "ai_sdk.test.mjs")


@pytest.mark.parametrize("body", [
    b"{not json",
    b"{}",
    b'{"id": "c", "messages": []}',
    b'{"id": "c", "messages": [{"role": "assistant", "parts": [{"type": "text", "text": "x"}]}]}',
    b'{"id": "c", "messages": [{"role": "user", "parts": [{"type": "text", "text": "  "}]}]}',
    b'{"id": "c", "messages": [{"role": "user", "parts": [{"type": "file", "url": "x"}]}]}',
    b'{"id": "c", "trigger": "regenerate-message",'
    b' "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}',
    b'{"id": "c", "model": "fake:nope",'
    b' "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}',
    b'{"id": "c", "max_tokens": 0,'
    b' "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}',
    # Refused once the chat's thread is made: the thread is removed again.
    b'{"id": "c", "max_tokens": 1000000000,'
    b' "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}]}',
])
def test_bad_chat_requests_get_a_4xx_and_create_nothing(stack: Stack, body: bytes) -> None:
    """Each malformed or refused chat request is a 4xx error body; no thread, no generation."""
    def threads() -> set[str]:
        listing = httpx.get(f"{stack.url}/v1/threads?limit=100", headers=AUTH, timeout=10)
        return {t["id"] for t in listing.json()["data"]}

    before = stored_generations(stack.redis_url), threads()
    response = httpx.post(f"{stack.url}/v1/ai-sdk/chat", content=body, timeout=10,
                          headers={**AUTH, "content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"code", "message"}
    assert (stored_generations(stack.redis_url), threads()) == before
    with redis.Redis.from_url(stack.redis_url) as client:  # the chat's thread, made or not
        assert client.exists(keys.thread_meta(chat_thread_id("acme", "c"))) == 0


def test_a_message_while_the_answer_is_written_is_a_409_that_creates_nothing(
        stack: Stack) -> None:
    """A second message to a chat whose answer runs is thread_busy, before any stream."""
    def body(text: str) -> dict[str, object]:
        return {"id": "busy-chat", "model": "fake:lorem", "max_tokens": 40,
                "messages": [{"role": "user", "parts": [{"type": "text", "text": text}]}]}

    url = f"{stack.url}/v1/ai-sdk/chat"
    with httpx.stream("POST", url, json=body("first"), headers=AUTH, timeout=10) as first:
        assert first.status_code == 200
        thread_id = first.headers["x-thread-id"]
        before = stored_generations(stack.redis_url)
        second = httpx.post(url, json=body("second"), headers=AUTH, timeout=10)
        assert second.status_code == 409, second.text
        assert second.json()["error"]["code"] == "thread_busy"
        assert stored_generations(stack.redis_url) == before
    thread = httpx.get(f"{stack.url}/v1/threads/{thread_id}", headers=AUTH, timeout=10).json()
    assert [m["content"] for m in thread["messages"] if m["role"] == "user"] == ["first"]


def test_resume_of_unknown_or_foreign_chats(stack: Stack) -> None:
    """An unknown chat has nothing being written (204); no key is 401; a bad id 400s."""
    url = f"{stack.url}/v1/ai-sdk/chat/never-used/stream"
    assert httpx.get(url, headers=AUTH, timeout=10).status_code == 204
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={**AUTH, "Last-Event-ID": "nope"}, timeout=10).status_code == 400
    long_id = "x" * 201
    response = httpx.get(f"{stack.url}/v1/ai-sdk/chat/{long_id}/stream", headers=AUTH, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_chat_id"


def ui_chunks(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The chunks of a UI message stream, until [DONE]."""
    for line in lines:
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return
            yield json.loads(line[len("data: "):])


def test_a_restarted_answer_says_so_and_resumes_from_its_restart(stack: Stack) -> None:
    """A worker stopped mid-answer: the stream ends the lost attempt with an error part; a
    resume replays the new attempt alone (one text part: the thread's answer) to finish."""
    body = {"id": "restarted-chat", "model": "fake:lorem", "max_tokens": 60,
            "messages": [{"role": "user", "parts": [{"type": "text", "text": "go"}]}]}
    first: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{stack.urls[0]}/v1/ai-sdk/chat", json=body, headers=AUTH,
                      timeout=20) as response:
        thread_id = response.headers["x-thread-id"]
        for chunk in ui_chunks(response.iter_lines()):
            first.append(chunk)
            if [c["type"] for c in first].count("text-delta") == 5:
                pid = _running_worker_pid(stack, response.headers["x-generation-id"])
                next(w for w in stack.workers if w.pid == pid).popen.send_signal(signal.SIGTERM)
            if chunk["type"] == "error":
                break
    assert first[-1]["errorText"] == RESTARTED_TEXT

    with httpx.stream("GET", f"{stack.urls[1]}/v1/ai-sdk/chat/restarted-chat/stream",
                      headers=AUTH, timeout=20) as response:
        assert response.status_code == 200
        resumed = list(ui_chunks(response.iter_lines()))
    kinds = [c["type"] for c in resumed]
    assert kinds[:2] == ["start", "text-start"] and kinds[-2:] == ["text-end", "finish"]
    assert kinds.count("text-start") == 1 and "error" not in kinds
    assert resumed[0]["messageId"] == first[0]["messageId"]
    text = "".join(c["delta"] for c in resumed if c["type"] == "text-delta")
    thread = wait_for(lambda: (t := httpx.get(f"{stack.url}/v1/threads/{thread_id}",
                                              headers=AUTH, timeout=10).json())
                      ["active_generation_id"] is None and t, 20, what="the answer recorded")
    assert text == thread["messages"][-1]["content"] and len(text.split()) == 60


def test_eventsource_reconnects_after_its_api_process_is_killed(node: str, stack: Stack) -> None:
    """npm eventsource reading a chat from one API process, killed with SIGKILL mid-answer,
    reconnects by itself (Last-Event-ID) to the other: every text part exactly once.
    Last in this module: it leaves the stack one API process short."""
    victim = stack.apis[0]
    assert isinstance(victim, Process)
    run_node(node, stack, "eventsource.test.mjs", TR_KILL_PID=str(victim.pid))
    assert not victim.alive()
