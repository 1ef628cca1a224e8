"""``tokenrelay dev``: a private Redis (unless one is configured), the API and one worker.

Stopping (Ctrl-C, or SIGTERM from a service manager) goes in order, so that
nothing talks to a Redis that is already gone: the API and the worker first (the
worker with no grace: it hands its running generations back to the queue at once,
where the next start picks them up), then Redis, which writes its data to
``--data-dir`` if one was given. The children run in sessions of their own
(``children``), so a terminal's Ctrl-C reaches only dev.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TextIO

import httpx

from tokenrelay.cli.children import own_session, signal_group
from tokenrelay.cli.client import DEFAULT_URL
from tokenrelay.cli.ports import bind_problem
from tokenrelay.cli.redis_server import RedisServer

# How long the API and the worker get to stop before they are killed. Each needs well
# under a second: the API ends its open streams with a reconnect hint, the worker hands
# its generations over (grace 0).
STOP_TIMEOUT_S = 5.0
# What the worker gets to finish running generations in dev, unless the environment says.
DEV_WORKER_GRACE_S = "0"
LOCK_NAME = "tokenrelay-dev.lock"


class Stop(BaseException):
    """SIGINT or SIGTERM arrived: stop everything. A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way swallows it."""


class DevStack:
    """The processes of one ``tokenrelay dev`` run, stopped in order by ``stop``."""

    def __init__(self, host: str, port: int, data_dir: Path | None, err: TextIO):
        self.host, self.port, self.data_dir, self.err = host, port, data_dir, err
        self.redis: RedisServer | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.stopping = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        if not env.get("TOKENRELAY_REDIS_URL"):
            self.redis = RedisServer(data_dir=self.data_dir, own_session=True).start()
            env["TOKENRELAY_REDIS_URL"] = self.redis.url
            print(f"private redis-server at {self.redis.url}", flush=True)
        env.setdefault("TOKENRELAY_WORKER_GRACE_S", DEV_WORKER_GRACE_S)
        me = [sys.executable, "-m", "tokenrelay"]
        self.api = subprocess.Popen(
            [*me, "api", "--host", self.host, "--port", str(self.port)], env=env, **own_session())
        self.worker = subprocess.Popen([*me, "worker"], env=env, **own_session())

    def children(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in (self.api, self.worker) if p is not None]

    def exited(self) -> str | None:
        """Which child has exited on its own, if any."""
        for name, proc in (("the API", self.api), ("the worker", self.worker)):
            if proc is not None and proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def wait_ready(self, timeout: float = 60) -> str | None:
        """None once the API answers /readyz, else why it will not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (why := self.exited()) is not None:
                return why
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return None
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # poll interval while the API starts
        return f"the API did not become ready at {self.url} in {timeout:.0f} s"

    def stop(self) -> None:
        """API and worker first (SIGTERM, then SIGKILL past the timeout), Redis last."""
        self.stopping = True
        children = self.children()
        for proc in children:
            signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in children:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
        if self.redis is not None:
            self.redis.stop()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into ``Stop``; ignore more while stopping."""

    def handler(signum: int, frame: FrameType | None) -> None:
        ignore_signals()
        raise Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[bool]:
    """Hold ``data_dir``'s lock: two Redis servers on one AOF would corrupt it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK_NAME, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def run(host: str, port: int, data_dir: Path | None, err: TextIO = sys.stderr) -> int:
    """Run until Ctrl-C or SIGTERM (exit 0), or until a child fails (exit 1)."""
    if data_dir is not None and os.environ.get("TOKENRELAY_REDIS_URL"):
        print("error: --data-dir is for the private redis-server, "
              "but TOKENRELAY_REDIS_URL is set", file=err)
        return 2
    if (problem := bind_problem(host, port)) is not None:
        print(f"error: {problem}", file=err)
        return 1
    with contextlib.ExitStack() as stack:
        if data_dir is not None and not stack.enter_context(locked(data_dir)):
            print(f"error: {data_dir} is in use by another tokenrelay dev", file=err)
            return 1
        return _supervise(DevStack(host, port, data_dir, err))


def _supervise(dev: DevStack) -> int:
    with stop_on_signals():
        try:
            dev.start()
            if (why := dev.wait_ready()) is not None:
                print(f"error: {why}", file=dev.err)
                return 1
            _announce(dev)
            while (why := dev.exited()) is None:
                time.sleep(0.2)  # poll interval; a signal interrupts it with Stop
            print(f"error: {why}; stopping", file=dev.err)
            return 1
        except Stop as stop:
            print(f"stopping ({stop})…", file=dev.err, flush=True)
            return 0
        finally:
            try:
                ignore_signals()
            except Stop:  # arrived just before: its handler already ignores the next ones
                pass
            dev.stop()


def _announce(dev: DevStack) -> None:
    url = "" if dev.url == DEFAULT_URL else f" --url {dev.url}"
    if dev.data_dir is not None:
        data = f"kept in {dev.data_dir}"
    elif dev.redis is not None:
        data = "gone when dev stops; --data-dir DIR keeps it"
    else:
        data = "in the Redis at TOKENRELAY_REDIS_URL"
    print(f"tokenrelay is running at {dev.url}  (Ctrl-C stops it)", flush=True)
    print(f"data: {data}", flush=True)
    print(f'try: tokenrelay chat "hello"{url}', flush=True)
