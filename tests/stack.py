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
import threading
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


class InProcessApi:
    """The API served by uvicorn on a thread of the test process: for tests that need
    one API and never kill it, it costs no interpreter start (about a second each)."""

    name = "api0 (in process)"

    def __init__(self, port: int, env: dict[str, str]):
        import uvicorn

        from tokenrelay.api.app import create_app
        from tokenrelay.shared.settings import Settings

        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:  # Settings reads the environment, as the API process would
            settings = Settings()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                log_level="critical", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="api-in-process",
                                       daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def output(self) -> str:
        return ""


class Stack:
    """A Redis, ``apis`` API processes and ``workers`` workers, wired together.

    ``in_process``: the (one) API runs on a thread of the test process instead.
    """

    def __init__(self, apis: int = 1, workers: int = 1, env: dict[str, str] | None = None,
                 redis_url: str | None = None, in_process: bool = False,
                 redis_binary: str | None = None):
        self.redis: RedisServer | None = None
        if redis_url is None:
            self.redis = RedisServer(binary=redis_binary).start()
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
        self.apis: list[Process | InProcessApi] = []
        self.ports: list[int] = []
        self.workers: list[Process] = []
        try:
            if in_process:
                assert apis == 1, "one API in process at most"
                self.ports.append(free_port())
                self.apis.append(InProcessApi(self.ports[0], self.env))
            for _ in range(0 if in_process else apis):
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
