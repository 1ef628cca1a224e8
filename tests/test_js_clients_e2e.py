"""npm clients against a real stack (two API processes, two workers): the Vercel AI SDK's
chat transport and the ``eventsource`` package, run by node's test runner from tests/js/,
plus the AI SDK routes' bad input."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.client import stored_generations
from tests.fake_upstream import fake_upstream
from tests.stack import Process, Stack

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
])
def test_bad_chat_requests_get_a_4xx_and_create_nothing(stack: Stack, body: bytes) -> None:
    """Each malformed or refused chat request is a 4xx error body; no thread, no generation."""
    before = stored_generations(stack.redis_url)
    response = httpx.post(f"{stack.url}/v1/ai-sdk/chat", content=body, timeout=10,
                          headers={**AUTH, "content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) == {"code", "message"}
    assert stored_generations(stack.redis_url) == before
    threads = httpx.get(f"{stack.url}/v1/threads", headers=AUTH, timeout=10).json()["data"]
    assert not [t for t in threads if t["title"] in ("hi", "x")]


def test_resume_of_unknown_or_foreign_chats(stack: Stack) -> None:
    """An unknown chat has nothing being written (204); no key is 401; a bad id 400s."""
    url = f"{stack.url}/v1/ai-sdk/chat/never-used/stream"
    assert httpx.get(url, headers=AUTH, timeout=10).status_code == 204
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={**AUTH, "Last-Event-ID": "nope"}, timeout=10).status_code == 400
    long_id = "x" * 201
    response = httpx.get(f"{stack.url}/v1/ai-sdk/chat/{long_id}/stream", headers=AUTH, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_chat_id"


def test_eventsource_reconnects_after_its_api_process_is_killed(node: str, stack: Stack) -> None:
    """npm eventsource reading a chat from one API process, killed with SIGKILL mid-answer,
    reconnects by itself (Last-Event-ID) to the other: every text part exactly once.
    Last in this module: it leaves the stack one API process short."""
    victim = stack.apis[0]
    assert isinstance(victim, Process)
    run_node(node, stack, "eventsource.test.mjs", TR_KILL_PID=str(victim.pid))
    assert not victim.alive()
