"""``tokenrelay chat`` and ``tokenrelay watch`` as a person runs them, against real processes.

Connections are cut by a small TCP proxy in front of the API, or by killing the API process;
terminals are pseudo-terminals, and Ctrl-C is a real SIGINT.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.cli.terminal import Cli, clean_env, gen_id_in, run
from tests.client import create, status
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.slow

SPINNER_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


@pytest.fixture(scope="module")
def cli_stack() -> Iterator[Stack]:
    """One API process and one worker; a fast fake model (200 words/s)."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_FAKE_TPS": "200"})
    yield s
    s.stop()


class CuttingProxy:
    """A TCP proxy in front of the API that cuts connections in the middle of an answer.

    ``cuts`` is a list of byte counts: connection number i (0-based) is closed, both ways,
    after the server sent it that many bytes; later connections pass through untouched.
    Every byte is kept, so a test can see what the client sent (``requests``), what it got
    (``responses``) and what the cut kept from it (``dropped``).
    """

    def __init__(self, upstream: int, cuts: list[int]):
        self.upstream = upstream
        self.plan = list(cuts)
        self.cut_count = 0
        self.requests: list[bytes] = []
        self.responses: list[bytes] = []
        self.dropped: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                index = len(self.requests)
                self.requests.append(b"")
                self.responses.append(b"")
                self.dropped.append(b"")
            limit = self.plan[index] if index < len(self.plan) else None
            threading.Thread(target=self._serve, args=(client, index, limit), daemon=True).start()

    def _serve(self, client: socket.socket, index: int, limit: int | None) -> None:
        server = socket.create_connection(("127.0.0.1", self.upstream))
        closed = threading.Event()

        def close_both() -> None:
            closed.set()
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

        def upstream_pump() -> None:
            while not closed.is_set():
                try:
                    data = client.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                self.requests[index] += data
                try:
                    server.sendall(data)
                except OSError:
                    break
            close_both()

        threading.Thread(target=upstream_pump, daemon=True).start()
        sent = 0
        while not closed.is_set():
            try:
                data = server.recv(65536)
            except OSError:
                break
            if not data:
                break
            if limit is not None and sent + len(data) >= limit:
                self.dropped[index] += data[limit - sent:]
                data = data[: limit - sent]
                self.responses[index] += data
                try:
                    client.sendall(data)
                except OSError:
                    pass
                self.cut_count += 1
                break
            sent += len(data)
            self.responses[index] += data
            try:
                client.sendall(data)
            except OSError:
                break
        close_both()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy_factory(cli_stack: Stack) -> Iterator[Any]:
    """Makes CuttingProxy instances in front of the stack's API; closes them after the test."""
    made: list[CuttingProxy] = []

    def make(cuts: list[int]) -> CuttingProxy:
        proxy = CuttingProxy(cli_stack.ports[0], cuts)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def event_ids(base: str, gen_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, type, data) of every event of a finished generation."""
    out = []
    with httpx.Client(timeout=30) as client, connect_sse(
        client, "GET", f"{base}/v1/generations/{gen_id}/events"
    ) as source:
        for sse in source.iter_sse():
            if sse.data:
                out.append((sse.id, sse.event, json.loads(sse.data)))
    return out


def test_chat_prints_exactly_the_status_content_across_a_cut_connection(
    cli_stack: Stack, proxy_factory: Any
) -> None:
    """A connection cut mid-answer is resumed silently; the printed text equals the status."""
    proxy = proxy_factory([1500])  # the POST's own stream dies after ~15 deltas
    cli = run("chat", "go", "--model", "fake:lorem", "--max-tokens", "200", "--url", proxy.url)
    assert cli.popen.returncode == 0, cli.err.text
    gen_id = gen_id_in(cli.err.text)
    final = status(cli_stack.url, gen_id)
    assert final["status"] == "completed"
    assert cli.stdout == final["content"]
    assert len(final["content"].split()) == 200

    assert proxy.cut_count == 1
    assert b"POST /v1/generations " in proxy.requests[0]
    assert b'"content"' in proxy.responses[0]  # it was cut with part of the answer delivered
    resumed = proxy.requests[1].lower()
    assert f"get /v1/generations/{gen_id}/events".encode() in resumed
    assert b"last-event-id: " in resumed
    assert "reconnect" not in cli.err.text and "error" not in cli.err.text  # silently


def test_chat_cut_several_times_still_prints_the_text_once(
    cli_stack: Stack, proxy_factory: Any
) -> None:
    """Three cuts in a row, one mid-frame: still exactly the status content, no duplicate."""
    proxy = proxy_factory([900, 333, 1234])
    cli = run("chat", "go", "--model", "fake:lorem", "--max-tokens", "150", "--url", proxy.url)
    assert cli.popen.returncode == 0, cli.err.text
    final = status(cli_stack.url, gen_id_in(cli.err.text))
    assert cli.stdout == final["content"]
    assert proxy.cut_count == 3


def test_chat_retries_a_create_whose_answer_was_lost(
    cli_stack: Stack, proxy_factory: Any
) -> None:
    """If the POST's answer never arrives, chat sends it again with the same Idempotency-Key
    and follows the one generation the server made."""
    proxy = proxy_factory([0])  # the server's answer to the first POST is dropped entirely
    cli = run("chat", "only once", "--url", proxy.url)
    assert cli.popen.returncode == 0, cli.err.text
    keys = [re.search(rb"(?i)idempotency-key: (\S+)", r) for r in proxy.requests[:2]]
    assert keys[0] and keys[1] and keys[0].group(1) == keys[1].group(1)
    assert b"POST /v1/generations " in proxy.requests[1]
    lost = re.search(rb"(?i)x-generation-id: (gen_\w+)", proxy.dropped[0])
    assert lost, "the server did answer the first POST (the proxy dropped it)"
    printed = gen_id_in(cli.err.text)
    assert printed == lost.group(1).decode()  # the same generation, not a second one
    assert cli.stdout == status(cli_stack.url, printed)["content"] == "only once"


def test_chat_resumes_when_its_api_process_restarts(cli_stack: Stack) -> None:
    """Kill the API mid-answer and start it again on the same port: chat finishes the text."""
    cli = Cli("chat", "go", "--model", "fake:lorem", "--max-tokens", "600",
              "--url", cli_stack.url)
    try:
        cli.wait_until(lambda c: len(c.out.data) >= 40, "first words from chat")
        port = cli_stack.ports[0]
        cli_stack.apis[0].kill()
        printed_at_kill = cli.out.text
        cli_stack.add_api(port=port)
        cli_stack.wait_ready(cli_stack.url)
        assert cli.wait() == 0, cli.err.text
    finally:
        cli.kill()
    final = status(cli_stack.url, gen_id_in(cli.err.text))
    assert final["status"] == "completed"
    assert cli.stdout == final["content"]
    assert len(printed_at_kill) < len(final["content"])


def test_chat_summary_has_usage_first_token_and_id(cli_stack: Stack) -> None:
    """The last stderr line gives finish reason, usage, time to first token and the id."""
    cli = run("chat", "three little words", "--url", cli_stack.url)
    assert cli.popen.returncode == 0
    assert cli.stdout == "three little words"
    summary = cli.err.text.strip().splitlines()[-1]
    assert re.fullmatch(
        r"\[completed · stop · \d+ prompt \+ 3 completion tokens · first token \d+ ms · "
        r"gen_[0-9a-f]{44}\]", summary), summary


def test_spinner_only_on_a_terminal(cli_stack: Stack) -> None:
    """On a terminal stderr shows a spinner while waiting; through a pipe it stays clean."""
    on_tty = Cli("chat", "hi", "--url", cli_stack.url, tty=("stderr",))
    assert on_tty.wait() == 0
    assert any(frame in on_tty.err.text for frame in SPINNER_FRAMES)
    assert "queued" in on_tty.err.text
    assert on_tty.stdout == "hi"

    piped = run("chat", "hi", "--url", cli_stack.url)
    assert piped.popen.returncode == 0
    assert not any(frame in piped.err.text for frame in SPINNER_FRAMES)
    assert "\x1b" not in piped.err.text and "\r" not in piped.err.text


def test_ctrl_c_then_cancel(cli_stack: Stack) -> None:
    """Ctrl-C asks; answering 'c' cancels the generation on the server."""
    cli = Cli("chat", "go", "--model", "fake:lorem", "--max-tokens", "20000",
              "--url", cli_stack.url, tty=("stdin",))
    try:
        cli.wait_until(lambda c: len(c.out.data) >= 20, "first words from chat")
        cli.popen.send_signal(signal.SIGINT)
        cli.wait_until(lambda c: "[c]ancel" in c.err.text, "the cancel-or-leave question")
        cli.type("c\n")
        assert cli.wait() == 130
    finally:
        cli.kill()
    gen_id = gen_id_in(cli.err.text)
    assert f"{gen_id}: cancelled" in cli.err.text
    final = wait_for(lambda: (s := status(cli_stack.url, gen_id))["status"] != "running" and s,
                     20, what="the generation to end")
    assert final["status"] == "cancelled"


def test_ctrl_c_then_leave_running_and_watch_again(cli_stack: Stack) -> None:
    """Answering 'leave' keeps the generation going; the printed watch command shows it all."""
    cli = Cli("chat", "go", "--model", "fake:lorem", "--max-tokens", "400",
              "--url", cli_stack.url, tty=("stdin",))
    try:
        cli.wait_until(lambda c: len(c.out.data) >= 20, "first words from chat")
        cli.popen.send_signal(signal.SIGINT)
        cli.wait_until(lambda c: "[c]ancel" in c.err.text, "the cancel-or-leave question")
        cli.type("l\n")
        assert cli.wait() == 130
    finally:
        cli.kill()
    gen_id = gen_id_in(cli.err.text)
    command = re.search(r"follow it again: (tokenrelay watch \S+ --url \S+)", cli.err.text)
    assert command, cli.err.text
    final = wait_for(lambda: (s := status(cli_stack.url, gen_id))["status"] == "completed" and s,
                     20, what="the generation to complete on its own")
    again = run(*command.group(1).split()[1:])
    assert again.popen.returncode == 0
    assert again.stdout == final["content"]


def test_ctrl_c_without_a_terminal_leaves_it_running(cli_stack: Stack) -> None:
    """With no terminal to ask on, Ctrl-C leaves the generation running and says how to watch."""
    cli = Cli("chat", "go", "--model", "fake:lorem", "--max-tokens", "400",
              "--url", cli_stack.url)
    try:
        cli.wait_until(lambda c: len(c.out.data) >= 20, "first words from chat")
        cli.popen.send_signal(signal.SIGINT)
        assert cli.wait() == 130
    finally:
        cli.kill()
    assert "[c]ancel" not in cli.err.text
    assert "left running" in cli.err.text
    gen_id = gen_id_in(cli.err.text)
    final = wait_for(lambda: (s := status(cli_stack.url, gen_id))["status"] == "completed" and s,
                     20, what="the generation to complete on its own")
    assert len(final["content"].split()) == 400


def test_watch_from_the_start_and_after_an_event_id(cli_stack: Stack) -> None:
    """watch ID prints the whole text; --after ID prints exactly what followed that event."""
    gen_id = create(cli_stack.url, model="fake:lorem", prompt="x", max_tokens=50)["id"]
    whole = run("watch", gen_id, "--url", cli_stack.url)
    assert whole.popen.returncode == 0
    content = status(cli_stack.url, gen_id)["content"]
    assert whole.stdout == content

    events = event_ids(cli_stack.url, gen_id)
    deltas = [(eid, data["content"]) for eid, etype, data in events if etype == "delta"]
    for k in (0, 1, 17, len(deltas) - 1):
        after_id = deltas[k][0]
        rest = run("watch", gen_id, "--after", after_id, "--url", cli_stack.url)
        assert rest.popen.returncode == 0
        assert rest.stdout == "".join(text for _, text in deltas[k + 1:])


def test_watch_follows_a_running_generation_live(cli_stack: Stack) -> None:
    """watch attached to a generation that is still streaming prints all of it, then ends."""
    gen_id = create(cli_stack.url, model="fake:lorem", prompt="x", max_tokens=600)["id"]
    cli = Cli("watch", gen_id, "--url", cli_stack.url)
    try:
        cli.wait_until(lambda c: len(c.out.data) >= 20, "first words from watch")
        assert status(cli_stack.url, gen_id)["status"] == "running"
        assert cli.wait() == 0
    finally:
        cli.kill()
    assert cli.stdout == status(cli_stack.url, gen_id)["content"]


def test_exit_codes(cli_stack: Stack) -> None:
    """0 completed, 1 failed, 2 refused, 3 cancelled, 4 unreachable."""
    assert run("chat", "ok", "--url", cli_stack.url).popen.returncode == 0
    failed = run("chat", "x", "--model", "fake:error", "--url", cli_stack.url)
    assert failed.popen.returncode == 1
    assert "upstream_error" in failed.err.text
    refused = run("chat", "x", "--model", "nope:x", "--url", cli_stack.url)
    assert refused.popen.returncode == 2
    assert "unknown_model" in refused.err.text
    unknown = run("watch", "gen_" + "0" * 32, "--url", cli_stack.url)
    assert unknown.popen.returncode == 2
    assert "not_found" in unknown.err.text
    with socket.socket() as closed_port:  # a port nobody listens on
        closed_port.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{closed_port.getsockname()[1]}"
        unreachable = run("chat", "x", "--url", nobody)
    assert unreachable.popen.returncode == 4

    gen_id = create(cli_stack.url, model="fake:lorem", prompt="x", max_tokens=20000)["id"]
    watcher = Cli("watch", gen_id, "--url", cli_stack.url)
    try:
        watcher.wait_until(lambda c: len(c.out.data) >= 20, "first words from watch")
        assert httpx.post(f"{cli_stack.url}/v1/generations/{gen_id}/cancel").status_code == 202
        wait_for(lambda: status(cli_stack.url, gen_id)["status"] == "cancelled", 20,
                 what="the server to cancel the generation")
        assert watcher.wait(20) == 3
    finally:
        watcher.kill()
    assert watcher.stdout == status(cli_stack.url, gen_id)["content"]


def test_api_key_and_share_link() -> None:
    """With auth on: chat needs the key; watch follows a share link with no key at all."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_API_KEYS": "acme:sekret",
                                      "TOKENRELAY_FAKE_TPS": "200"})
    try:
        no_key = run("chat", "x", "--url", s.url)
        assert no_key.popen.returncode == 2
        assert "unauthorized" in no_key.err.text
        with_key = run("chat", "hello key", "--url", s.url, "--api-key", "sekret")
        assert with_key.popen.returncode == 0
        assert with_key.stdout == "hello key"

        auth = {"Authorization": "Bearer sekret"}
        created = create(s.url, headers=auth, model="fake:lorem", prompt="x", max_tokens=40)
        link = f"{s.url}/?view={created['id']}&token={created['stream_token']}"
        shared = run("watch", link)
        assert shared.popen.returncode == 0, shared.err.text
        assert shared.stdout == status(s.url, created["id"], headers=auth)["content"]
        assert run("watch", created["id"], "--url", s.url).popen.returncode == 2
    finally:
        s.stop()


# ---- the first five minutes: output, stdin, version, help ---------------------------------

COLOUR = re.compile(r"\x1b\[[0-9;]*(?:3[0-7]|9[0-7]|38;[0-9;]+)m")  # an SGR foreground colour


def test_summary_and_errors_are_coloured_on_a_terminal(cli_stack: Stack) -> None:
    """On a terminal the summary line and an error are coloured; the answer on stdout is not."""
    done = Cli("chat", "colour me", "--url", cli_stack.url, tty=("stderr",))
    assert done.wait() == 0
    summary = done.err.text.strip().splitlines()[-1]
    assert COLOUR.search(summary), repr(summary)
    assert done.stdout == "colour me"

    refused = Cli("chat", "x", "--model", "nope:x", "--url", cli_stack.url, tty=("stderr",))
    assert refused.wait() == 2
    assert COLOUR.search(refused.err.text), repr(refused.err.text)
    assert "unknown_model" in refused.err.text


def test_no_colour_with_NO_COLOR_or_without_a_terminal(cli_stack: Stack) -> None:
    """NO_COLOR on a terminal, or a pipe, gives the same words without a colour code."""
    no_color = Cli("chat", "plain", "--url", cli_stack.url, tty=("stderr",),
                   env=clean_env(NO_COLOR="1"))
    assert no_color.wait() == 0
    assert not COLOUR.search(no_color.err.text), repr(no_color.err.text)
    assert "completed" in no_color.err.text

    piped = run("chat", "x", "--model", "nope:x", "--url", cli_stack.url)
    assert piped.popen.returncode == 2
    assert piped.err.text.startswith("error: ") and "\x1b" not in piped.err.text


def test_prompt_from_stdin(cli_stack: Stack) -> None:
    """`echo … | tokenrelay chat -` reads the prompt from stdin; so does no prompt at all when
    stdin is not a terminal."""
    dash = run("chat", "-", "--url", cli_stack.url, stdin=b"piped prompt\n")
    assert dash.popen.returncode == 0, dash.err.text
    assert dash.stdout == "piped prompt"
    bare = run("chat", "--url", cli_stack.url, stdin=b"no prompt given\n")
    assert bare.popen.returncode == 0, bare.err.text
    assert bare.stdout == "no prompt given"


def test_no_prompt_on_a_terminal_opens_a_session_and_says_when_unreachable() -> None:
    """With no prompt and a terminal on stdin, chat opens an interactive session instead of
    waiting for stdin; with nothing listening it says so at once (code 4)."""
    cli = Cli("chat", "--url", "http://127.0.0.1:9", tty=("stdin",))
    try:
        assert cli.wait(20) == 4
    finally:
        cli.kill()
    assert "cannot reach http://127.0.0.1:9" in cli.err.text


def test_version() -> None:
    """`tokenrelay --version` prints the installed version."""
    from tokenrelay import __version__

    cli = run("--version")
    assert cli.popen.returncode == 0
    assert cli.out.text.strip() == f"tokenrelay {__version__}"


def test_help_describes_every_option_and_has_no_markup() -> None:
    """`dev`, `api` and `worker` --help describe each option; the top-level help reads as
    plain text (no reStructuredText)."""
    top = run("--help")
    assert top.popen.returncode == 0
    assert "``" not in top.out.text
    assert "tokenrelay dev" in top.out.text
    for command in ("dev", "api", "worker"):
        cli = run(command, "--help")
        assert cli.popen.returncode == 0
        text = cli.out.text.split("options:", 1)[1]
        # One entry per option: "  --name METAVAR  help", whose help may wrap onto more lines.
        entries = re.split(r"\n  (?=-)", "\n" + text.strip("\n"))[1:]
        assert entries, text
        for entry in entries:
            words = re.sub(r"^(-[-\w]+(?: [A-Z_]+)?(?:, )?)+", "", entry.strip())
            assert len(words.split()) >= 3, f"{command}: no description for {entry!r}"


def test_watch_after_an_event_reports_no_first_token(cli_stack: Stack) -> None:
    """watch --after did not see the first token, so its summary gives no time to it."""
    gen_id = create(cli_stack.url, model="fake:lorem", prompt="x", max_tokens=30)["id"]
    whole = run("watch", gen_id, "--url", cli_stack.url)
    assert whole.popen.returncode == 0
    assert "first token" in whole.err.text  # from the start it did
    deltas = [eid for eid, etype, _ in event_ids(cli_stack.url, gen_id) if etype == "delta"]
    rest = run("watch", gen_id, "--after", deltas[3], "--url", cli_stack.url)
    assert rest.popen.returncode == 0
    summary = rest.err.text.strip().splitlines()[-1]
    assert summary.startswith("[completed") and "first token" not in summary, summary
