"""A ``tokenrelay`` command run the way a person runs it: a real process, pipes or a
pseudo-terminal for each stream, and an environment free of the tester's own settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from typing import Any

from tests.stack import ROOT, wait_for

# Variables of the tester's environment that would change what a command prints.
_LOCAL = ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment less TOKENRELAY_* and colour settings, a colour terminal type, plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TOKENRELAY_") and k not in _LOCAL}
    env["TERM"] = "xterm-256color"
    env.update(extra)
    return env


class Drain:
    """Reads one output of a process (a pipe or a pty master) into memory, in a thread."""

    def __init__(self, fd: int):
        self.fd = fd
        self.data = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the pty's other side is gone
                break
            if not chunk:
                break
            self.data += chunk
        os.close(self.fd)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


class Cli:
    """``tokenrelay ARGS`` in a subprocess; ``tty`` names the streams that get a terminal."""

    def __init__(self, *args: str, tty: tuple[str, ...] = (), stdin: bytes | None = None,
                 env: dict[str, str] | None = None, new_session: bool = False):
        streams: dict[str, Any] = {}
        self._close: list[int] = []
        self.masters: dict[str, int] = {}
        readers: dict[str, int] = {}
        for name in ("stdin", "stdout", "stderr"):
            if name in tty:
                master, slave = os.openpty()
                streams[name] = slave
                self._close.append(slave)
                self.masters[name] = master
                if name != "stdin":
                    readers[name] = master
            elif name == "stdin" and stdin is not None:
                r, w = os.pipe()
                streams[name] = r
                self._close.append(r)
                self._feed = w
            elif name == "stdin":
                streams[name] = subprocess.DEVNULL
            else:
                r, w = os.pipe()
                streams[name] = w
                self._close.append(w)
                readers[name] = r
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay", *args], cwd=ROOT,
            env=env if env is not None else clean_env(), start_new_session=new_session,
            **streams,
        )
        for fd in self._close:
            os.close(fd)
        if stdin is not None:
            os.write(self._feed, stdin)  # small: fits the pipe's buffer
            os.close(self._feed)
        self.out = Drain(readers["stdout"])
        self.err = Drain(readers["stderr"])

    def wait_until(self, predicate: Any, what: str, timeout: float = 20) -> None:
        """Poll ``predicate(self)``; on timeout, fail showing what the process printed."""
        try:
            wait_for(lambda: predicate(self), timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstdout: {self.out.text[-500:]!r}\n"
                                 f"stderr: {self.err.text[-2000:]!r}") from None

    def type(self, text: str) -> None:
        os.write(self.masters["stdin"], text.encode())

    def wait(self, timeout: float = 60) -> int:
        code = self.popen.wait(timeout)
        self.out.thread.join(10)
        self.err.thread.join(10)
        if "stdin" in self.masters:
            os.close(self.masters["stdin"])
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.wait()

    @property
    def stdout(self) -> str:
        """What was printed, less the newline the client ends with."""
        text = self.out.text
        return text[:-1] if text.endswith("\n") else text


def run(*args: str, timeout: float = 60, **options: Any) -> Cli:
    cli = Cli(*args, **options)
    cli.wait(timeout)
    return cli


def gen_id_in(stderr: str) -> str:
    found = re.findall(r"gen_[0-9a-f]{44}", stderr)
    assert found, f"no generation id in: {stderr!r}"
    return found[-1]


