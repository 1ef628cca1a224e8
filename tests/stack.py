"""Real tokenrelay processes for end-to-end tests: a private redis-server, API processes, workers.

Only the LLM provider is fake (the built-in ``fake:`` provider, or a local
OpenAI-compatible test server). Nothing here touches a Redis it did not start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tokenrelay.cli.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Process:
    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"tr-{name}-", suffix=".log", delete=False)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay", *args],
            env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")


class Stack:
    """A Redis, ``apis`` API processes and ``workers`` workers, wired together."""

    def __init__(self, apis: int = 1, workers: int = 1, env: dict[str, str] | None = None,
                 redis_url: str | None = None):
        self.redis: RedisServer | None = None
        if redis_url is None:
            self.redis = RedisServer().start()
            redis_url = self.redis.url
        self.redis_url = redis_url
        self.env = {
            **{k: v for k, v in os.environ.items()
               if not k.startswith("TOKENRELAY_") and k != "OPENAI_API_KEY"},
            "TOKENRELAY_REDIS_URL": redis_url,
            "TOKENRELAY_FAKE_TTFT_MS": "0",
            "TOKENRELAY_LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self.apis: list[Process] = []
        self.ports: list[int] = []
        self.workers: list[Process] = []
        try:
            for _ in range(apis):
                self.add_api()
            for _ in range(workers):
                self.add_worker()
            for url in self.urls:
                self.wait_ready(url)
        except AssertionError as exc:
            logs = "\n".join(f"--- {p.name}:\n{p.output()[-3000:]}" for p in self.apis)
            self.stop()
            raise AssertionError(f"{exc}\n{logs}") from None
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        return self.urls[0]

    def add_api(self, port: int | None = None) -> Process:
        port = port or free_port()
        proc = Process(f"api{len(self.apis)}", ["api", "--port", str(port)], self.env)
        self.apis.append(proc)
        self.ports.append(port)
        return proc

    def add_worker(self) -> Process:
        proc = Process(f"worker{len(self.workers)}", ["worker"], self.env)
        self.workers.append(proc)
        return proc

    def wait_ready(self, url: str, timeout: float = 60.0) -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, 0.05, f"{url} ready")

    def stop(self) -> None:
        for proc in [*self.apis, *self.workers]:
            proc.stop()
        if self.redis is not None:
            self.redis.stop()
