"""Time to first token added by the relay, against a real model.

    python bench/real_model_ttft.py [--runs 20] [--max-tokens 8]

Starts llama-cpp-python's server with SmolLM2-135M (tests/llama_server.py; install
it with .ci/realmodel-deps), a private redis-server, one API process and one worker
whose upstream is that server. Then, over one keep-alive client, one request at a
time and alternating so that all three see the same machine, the same greedy prompt:
straight to the llama server's ``/v1/chat/completions``, through tokenrelay's native
``POST /v1/generations`` with ``Accept: text/event-stream`` (one call), and through its
OpenAI facade (``/v1/chat/completions``, ``stream: true``). Time to first token: the
request sent to the first content received. Reports medians and the relay's added time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stack, machine_note, save  # noqa: E402
from tests.llama_server import MISSING, MODEL, LlamaServer  # noqa: E402

PROMPT = "Write one sentence about the sea."


def direct_ttft(client: httpx.Client, base_url: str, max_tokens: int) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return _first_chunk_content(client, f"{base_url}/chat/completions", body)


def native_ttft(client: httpx.Client, base: str, max_tokens: int) -> float:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    with client.stream("POST", f"{base}/v1/generations", json=body,
                       headers={"Accept": "text/event-stream"}) as response:
        response.raise_for_status()
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif event == "delta" and line.startswith("data: "):
                if json.loads(line[len("data: "):]).get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("no content delta")


def facade_ttft(client: httpx.Client, base: str, max_tokens: int) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return _first_chunk_content(client, f"{base}/v1/chat/completions", body)


def _first_chunk_content(client: httpx.Client, url: str, body: dict[str, object]) -> float:
    """Seconds from sending ``body`` to the first chat.completion.chunk with content."""
    started = time.perf_counter()
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[len("data: "):])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    return time.perf_counter() - started
    raise RuntimeError("no content delta")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    if MISSING:
        raise SystemExit(MISSING)
    note = machine_note()
    llama = LlamaServer()
    stack = Stack(apis=1, workers=1, env={"TOKENRELAY_OPENAI_BASE_URL": llama.base_url})
    try:
        with httpx.Client(timeout=60) as client:
            ways: dict[str, Callable[[], float]] = {
                "direct": lambda: direct_ttft(client, llama.base_url, args.max_tokens),
                "native": lambda: native_ttft(client, stack.url, args.max_tokens),
                "facade": lambda: facade_ttft(client, stack.url, args.max_tokens),
            }
            for way in ways.values():  # warm-up: model load, connection pools, imports
                way()
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.runs):
                for name, way in ways.items():
                    times[name].append(way() * 1000)
    finally:
        stack.stop()
        llama.stop()
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:7s} median {medians[name]:6.1f} ms  min {min(values):6.1f}  "
              f"max {max(values):6.1f}  (n={len(values)})")
    added = {name: medians[name] - medians["direct"] for name in ("native", "facade")}
    print(f"added by the relay (median): native {added['native']:.1f} ms, "
          f"facade {added['facade']:.1f} ms; {note}")
    save("real_model_ttft", {"runs": args.runs, "max_tokens": args.max_tokens,
                             "prompt": PROMPT, "median_ms": medians,
                             "added_ms": added, "ttft_ms": times, "note": note})


if __name__ == "__main__":
    main()
