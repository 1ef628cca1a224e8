"""tokenrelay in front of a real model: llama-cpp-python's server running SmolLM2-135M.

The upstream is not faked here: a real OpenAI-compatible server with a real model,
with its real quirks (no usage when streaming, an empty 200 for a prompt over its
context, a stream cut without a finish reason when it dies). A TCP proxy in front of
it counts the requests and sees connections close. Greedy decoding (temperature 0)
makes the model's answer the same straight from the server and through tokenrelay.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.cli.terminal import Cli, clean_env, run
from tests.client import collect, create, status, text_of
from tests.llama_server import MISSING, MODEL, LlamaServer, chat_direct
from tests.stack import ROOT, Stack, wait_for
from tests.tcp_proxy import TcpProxy
from tokenrelay.cli.redis_server import free_port
from tokenrelay.shared.events import Event

if MISSING and os.environ.get("CI"):
    # CI installs them (.ci/realmodel-deps); a skip there would hide that this never ran.
    raise RuntimeError(f"real-model tests cannot run in CI: {MISSING}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

SHORT = "Write one sentence about the sea."
LONG = "Write a long story about a lighthouse keeper."
WRONG_KEY = "not-the-key"


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    server = LlamaServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(llama: LlamaServer) -> Iterator[TcpProxy]:
    with TcpProxy(llama.port) as found:
        yield found


@pytest.fixture(scope="module")
def stack(proxy: TcpProxy) -> Iterator[Stack]:
    """API and worker whose upstream is the llama server, through the proxy."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_OPENAI_BASE_URL": proxy.base_url})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def spare() -> Iterator[tuple[Stack, int]]:
    """A second stack whose upstream port each test fills with a server of its own (one to
    kill, one that wants another key); it sends the wrong key to any that checks."""
    port = free_port()
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
                                      "TOKENRELAY_OPENAI_API_KEY": WRONG_KEY})
    yield s, port
    s.stop()


def _events(url: str, gen_id: str) -> list[Event]:
    return collect(url, gen_id, timeout=120)


def test_create_and_stream_is_the_models_answer(stack: Stack, llama: LlamaServer) -> None:
    """A bare model name streams the model's own answer: deltas join to the status content
    and to what the server gives directly, `done` carries its finish_reason, and usage the
    server never sends is estimated (characters / 4) and marked so."""
    direct = chat_direct(llama.base_url, SHORT, max_tokens=40)
    gen = create(stack.url, model=MODEL, prompt=SHORT, max_tokens=40, temperature=0)
    events = _events(stack.url, gen["id"])
    final = status(stack.url, gen["id"])
    text = text_of(events)
    assert final["status"] == "completed" and text.strip()
    assert text == final["content"] == direct["text"]
    assert [e.type for e in events].count("delta") >= 2
    done = events[-1]
    assert done.type == "done" and done.data["finish_reason"] == direct["finish_reason"]
    assert done.data["usage"] == final["usage"]
    usage = done.data["usage"]
    assert usage["estimated"] is True
    assert usage["completion_tokens"] == math.ceil(len(text) / 4)
    assert usage["prompt_tokens"] == math.ceil(len(SHORT) / 4)


def test_resume_mid_stream_gives_exactly_the_remaining_events(stack: Stack) -> None:
    """Reconnecting with Last-Event-ID mid-answer gives exactly the events after that id."""
    gen = create(stack.url, model=MODEL, prompt=LONG, max_tokens=200, temperature=0)
    first = collect(stack.url, gen["id"], limit=6)  # queued, running, 4 deltas
    assert first[-1].type == "delta"
    assert status(stack.url, gen["id"])["status"] == "running"
    rest = collect(stack.url, gen["id"], after=first[-1].id, timeout=120)
    whole = _events(stack.url, gen["id"])
    assert first + rest == whole
    assert rest[-1].type == "done" and rest[-1].data["finish_reason"] == "length"


def test_cancel_mid_stream_stops_the_model(stack: Stack, llama: LlamaServer,
                                           proxy: TcpProxy) -> None:
    """Cancel mid-answer ends with `cancelled`, closes the connection to the llama server
    before its answer's end, and the server stops generating (it says so, its CPU goes idle)."""
    closes, disconnects = proxy.client_closed_mid_response, llama.log().count("Disconnected")
    gen = create(stack.url, model=MODEL, prompt=LONG, max_tokens=400, temperature=0)
    first = collect(stack.url, gen["id"], limit=5)
    assert first[-1].type == "delta"
    assert httpx.post(f"{stack.url}/v1/generations/{gen['id']}/cancel").status_code == 202
    rest = collect(stack.url, gen["id"], after=first[-1].id, timeout=60)
    assert rest[-1].type == "cancelled"
    assert status(stack.url, gen["id"])["status"] == "cancelled"
    wait_for(lambda: proxy.client_closed_mid_response > closes, 10,
             what="the worker's connection to the model closed mid-answer")
    wait_for(lambda: llama.log().count("Disconnected") > disconnects, 10,
             what="the llama server saw the client go")

    def idle() -> bool:  # 400 tokens take seconds of CPU; a stopped server uses none
        before = llama.cpu_seconds()
        time.sleep(0.5)  # a measuring window, not a wait for a condition
        return llama.cpu_seconds() - before < 0.1

    wait_for(idle, 10, 0, what="the llama server idle after the cancel")


def test_prompt_over_the_context_is_not_completed(stack: Stack) -> None:
    """A prompt longer than n_ctx (the server answers 200 with an empty stream) fails with
    upstream_incomplete, not retryable, instead of completing empty."""
    gen = create(stack.url, model=MODEL, prompt="word " * 1000, max_tokens=16)
    events = _events(stack.url, gen["id"])
    assert [e.type for e in events] == ["status", "status", "error"]
    error = events[-1].data
    assert error["code"] == "upstream_incomplete" and error["retryable"] is False
    final = status(stack.url, gen["id"])
    assert final["status"] == "failed" and final["finish_reason"] is None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "shut-down"])
def test_upstream_gone_mid_answer_is_not_completed(spare: tuple[Stack, int],
                                                   sig: signal.Signals) -> None:
    """The llama server killed (or shut down) mid-answer: the generation fails with
    upstream_incomplete, retryable, keeping the text it had; never `completed`."""
    s, port = spare
    server = LlamaServer(port=port)
    try:
        gen = create(s.url, model=MODEL, prompt=LONG, max_tokens=400, temperature=0)
        first = collect(s.url, gen["id"], limit=5)
        assert first[-1].type == "delta"
        server.signal(sig)
        rest = collect(s.url, gen["id"], after=first[-1].id, timeout=60)
    finally:
        server.stop()
    events = first + rest
    assert [e.type for e in events].count("done") == 0
    error = events[-1]
    assert error.type == "error", events[-3:]
    assert error.data["code"] == "upstream_incomplete" and error.data["retryable"] is True
    final = status(s.url, gen["id"])
    assert final["status"] == "failed"
    assert final["content"] == text_of(events) != ""


def test_wrong_upstream_key_fails_once_and_not_retryable(spare: tuple[Stack, int]) -> None:
    """A server that wants another key: one `error` event, not retryable, HTTP 401 kept, a
    generic message (the server's words only in the worker's log), and exactly one upstream
    call, also through the OpenAI SDK on the facade, which retries what it is told it may."""
    s, port = spare
    server = LlamaServer(api_key="secret")
    try:
        with TcpProxy(server.port, port=port) as proxy:
            gen = create(s.url, model=MODEL, prompt=SHORT, max_tokens=8)
            events = _events(s.url, gen["id"])
            assert [e.type for e in events] == ["status", "status", "error"]
            assert events[-1].data == {
                "code": "upstream_error", "retryable": False, "upstream_status": 401,
                "message": "the upstream refused the credentials (HTTP 401)"}
            assert proxy.requests == 1
            final = status(s.url, gen["id"])
            assert final["error"]["upstream_status"] == 401
            logged = [line for line in s.workers[0].output().splitlines()
                      if gen["id"] in line and "Invalid API key" in line]
            assert len(logged) == 1 and "(HTTP 401)" in logged[0]

            client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused")  # max_retries=2
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": SHORT}], max_tokens=8)
            assert info.value.code == "upstream_error"
            assert proxy.requests == 2  # one more call, not three
    finally:
        server.stop()


def test_openai_sdk_on_the_facade_streams_the_models_text(stack: Stack,
                                                          llama: LlamaServer) -> None:
    """The official SDK streaming from /v1/chat/completions gets the model's own text and
    finish_reason; /v1/models lists the server's model (asked from the upstream)."""
    direct = chat_direct(llama.base_url, SHORT, max_tokens=40)
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    text, finish = "", None
    for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": SHORT}], max_tokens=40,
        temperature=0, stream=True,
    ):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == direct["text"] != ""
    assert finish == direct["finish_reason"]
    assert f"openai:{MODEL}" in [m.id for m in client.models.list()]


def test_the_readme_recipe_for_a_local_llama_cpp_server_works_as_written(proxy: TcpProxy) -> None:
    """The README's "local Ollama or llama.cpp server" recipe, followed as written with its
    llama.cpp line (this server's port in place of the recipe's 8080): `tokenrelay dev` with
    those exports, then `tokenrelay chat "..."` in another terminal answers with the model's
    text, through one call to the server."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("**A local Ollama or llama.cpp server**")
    block = readme[start : readme.index("```\n", readme.index("```sh", start) + 5)]
    exports = dict(re.findall(r"^#?\s*export (\w+)=(\S+)", block, re.M))  # llama.cpp's line last
    assert exports["TOKENRELAY_OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1", exports
    prompt = re.findall(r'^tokenrelay chat "([^"]+)"$', block, re.M)[-1]
    exports["TOKENRELAY_OPENAI_BASE_URL"] = proxy.base_url
    port = free_port()
    dev = Cli("dev", "--port", str(port), new_session=True, env=clean_env(**exports))
    try:
        dev.wait_until(lambda c: "tokenrelay is running at" in c.out.text, "dev to start", 60)
        sent = proxy.requests
        chat = run("chat", prompt, timeout=180,
                   env=clean_env(TOKENRELAY_URL=f"http://127.0.0.1:{port}"))
        assert chat.popen.returncode == 0, chat.err.text
        assert chat.stdout.strip(), chat.err.text
        assert "completed" in chat.err.text and exports["TOKENRELAY_DEFAULT_MODEL"] != "fake:echo"
        assert proxy.requests == sent + 1
    finally:
        if dev.popen.poll() is None:
            os.killpg(dev.popen.pid, signal.SIGINT)
        dev.wait(30)
