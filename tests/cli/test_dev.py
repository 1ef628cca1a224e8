"""``tokenrelay dev`` as a person runs it: started from a terminal (its own process group, so
Ctrl-C is a SIGINT to that whole group), stopped by Ctrl-C or by a service manager's SIGTERM,
restarted on the same data; and ``dev`` / ``api`` on a port that is already taken."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli.terminal import Cli, clean_env, run
from tests.client import create, status
from tests.stack import wait_for
from tokenrelay.cli.redis_server import free_port

pytestmark = pytest.mark.slow

READY = re.compile(r"tokenrelay is running at (http://\S+)")


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every living process under ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    cmd = (Path("/proc") / str(child) / "cmdline").read_bytes()
                except OSError:
                    continue
                found[child] = cmd.replace(b"\0", b" ").decode(errors="replace")
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Dev:
    """``tokenrelay dev`` in a session of its own, as a shell runs a foreground job."""

    def __init__(self, *args: str, fake_tps: str = "30"):
        self.port = free_port()
        self.cli = Cli("dev", "--port", str(self.port), *args, new_session=True,
                       env=clean_env(TOKENRELAY_FAKE_TPS=fake_tps,
                                     TOKENRELAY_FAKE_TTFT_MS="0"))
        self.children: dict[int, str] = {}
        self.url = ""

    @property
    def output(self) -> str:
        return self.cli.out.text + self.cli.err.text

    def wait_ready(self) -> str:
        self.cli.wait_until(lambda c: READY.search(c.out.text), "dev to say it is running", 60)
        match = READY.search(self.cli.out.text)
        assert match
        self.url = match.group(1)
        self.children = descendants(self.cli.popen.pid)
        kinds = sorted(self.kind(cmd) for cmd in self.children.values())
        assert kinds == ["api", "redis-server", "worker"], self.children
        return self.url

    @staticmethod
    def kind(cmd: str) -> str:
        if "redis-server" in cmd:
            return "redis-server"
        return "api" if " api " in cmd else "worker" if cmd.rstrip().endswith("worker") else cmd

    def stop_by(self, send: str) -> float:
        """Stop dev the way a person would; seconds until it exited."""
        start = time.monotonic()
        if send == "ctrl-c":  # the terminal sends SIGINT to the whole foreground group
            os.killpg(self.cli.popen.pid, signal.SIGINT)
        else:
            self.cli.popen.send_signal(signal.SIGTERM)
        self.cli.wait(30)
        return time.monotonic() - start

    def left_behind(self) -> dict[int, str]:
        """Children of this run still alive once they have had the time to go."""
        try:
            wait_for(lambda: not any(alive(pid) for pid in self.children), 5,
                     what="dev's children to exit")
        except AssertionError:
            pass
        return {pid: cmd for pid, cmd in self.children.items() if alive(pid)}

    def clean_up(self) -> None:
        """Kill what this test started and what is still there: dev, then its children."""
        self.cli.kill()
        for pid in self.children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def dev_factory() -> Iterator[type[Dev]]:
    made: list[Dev] = []

    class Made(Dev):
        def __init__(self, *args: str, **kwargs: str):
            super().__init__(*args, **kwargs)
            made.append(self)

    yield Made
    for dev in made:
        dev.clean_up()


class Viewer(threading.Thread):
    """Follows one generation's event stream, as `tokenrelay chat` in another terminal would."""

    def __init__(self, url: str, gen_id: str):
        super().__init__(daemon=True)
        self.url, self.gen_id = url, gen_id
        self.body = b""

    def run(self) -> None:
        try:
            with httpx.stream("GET", f"{self.url}/v1/generations/{self.gen_id}/events",
                              timeout=httpx.Timeout(10, read=60)) as response:
                for chunk in response.iter_bytes():
                    self.body += chunk
        except httpx.HTTPError:
            pass


def test_ctrl_c_mid_generation_stops_everything_fast_and_quietly(dev_factory: type[Dev]) -> None:
    """Ctrl-C while an answer streams to a viewer: dev, Redis, API and worker are gone in under
    3 s, and the output has no flood of connection errors."""
    dev = dev_factory()
    url = dev.wait_ready()
    gen_id = create(url, model="fake:lorem", prompt="x", max_tokens=5000)["id"]
    viewer = Viewer(url, gen_id)
    viewer.start()
    wait_for(lambda: viewer.body.count(b"event: delta") >= 10, 20, what="deltas to the viewer")
    assert status(url, gen_id)["status"] == "running"
    before = len(dev.output)

    took = dev.stop_by("ctrl-c")

    after = dev.output[before:]
    assert took < 3.0, f"dev took {took:.1f}s to stop:\n{after[-3000:]}"
    assert dev.cli.popen.returncode == 0, after
    assert "refused" not in after.lower() and "Traceback" not in after, after[-3000:]
    warnings = [line for line in after.splitlines() if re.search(r"WARNING|ERROR", line)]
    assert len(warnings) <= 3, "\n".join(warnings)
    assert not dev.left_behind()
    viewer.join(10)
    assert b"shutting down, reconnect" in viewer.body  # the API ended the stream with its hint


def test_sigterm_leaves_no_process_behind(dev_factory: type[Dev]) -> None:
    """SIGTERM to dev (a service manager, `kill`) stops its redis-server, API and worker too."""
    dev = dev_factory()
    dev.wait_ready()
    took = dev.stop_by("sigterm")
    assert not dev.left_behind(), dev.output[-2000:]
    assert took < 3.0, dev.output[-2000:]
    assert dev.cli.popen.returncode == 0


def test_data_dir_keeps_generations_across_a_restart(dev_factory: type[Dev],
                                                     tmp_path: Path) -> None:
    """With --data-dir a finished generation is still there after dev stops and starts again;
    the data lives in that directory, not in a temporary one."""
    data = tmp_path / "data"
    first = dev_factory("--data-dir", str(data), fake_tps="200")
    url = first.wait_ready()
    gen_id = create(url, model="fake:echo", prompt="still here after a restart")["id"]
    wait_for(lambda: status(url, gen_id)["status"] == "completed", 20,
             what="the generation to complete")
    first.stop_by("sigterm")
    assert not first.left_behind()
    assert any(p.is_file() and p.stat().st_size > 0 and "aof" in p.name
               for p in data.rglob("*")), sorted(data.rglob("*"))

    second = dev_factory("--data-dir", str(data))
    url = second.wait_ready()
    again = status(url, gen_id)
    assert again["status"] == "completed"
    assert again["content"] == "still here after a restart"


def test_without_data_dir_dev_says_data_is_gone_on_exit(dev_factory: type[Dev]) -> None:
    """dev tells a newcomer that its data does not outlive it, and how to keep it."""
    dev = dev_factory()
    dev.wait_ready()
    assert "--data-dir" in dev.cli.out.text


@pytest.mark.parametrize("command", ["dev", "api"])
def test_a_busy_port_is_one_clear_line(command: str) -> None:
    """`dev` or `api` on a port already in use: one line naming the port, a non-zero exit, no
    traceback (and dev starts nothing)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cli = run(command, "--port", str(port), timeout=30,
                  env=clean_env(TOKENRELAY_REDIS_URL="redis://127.0.0.1:1/0") if command == "api"
                  else clean_env())
    assert cli.popen.returncode not in (0, None)
    lines = cli.err.text.strip().splitlines()
    assert lines == [f"error: port {port} on 127.0.0.1 is already in use"], cli.err.text
    assert "private redis-server" not in cli.out.text
