"""The API's own metrics, from a real API process: generations created through it."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.client import create
from tests.stack import Stack

pytestmark = pytest.mark.slow  # starts real processes


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """One API process and one fast worker."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_FAKE_TPS": "1000"})
    yield s
    s.stop()


def _created(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    match = re.search(r"^tokenrelay_generations_created_total (\S+)$", text, re.MULTILINE)
    assert match, "tokenrelay_generations_created_total not in /metrics"
    return float(match[1])


def test_created_counts_each_generation_created_once(stack: Stack) -> None:
    """Native and OpenAI-facade creates count one each; an idempotent replay and a
    refused create count nothing."""
    before = _created(stack.url)
    first = create(stack.url, model="fake:echo", prompt="a",
                   headers={"Idempotency-Key": "once"})
    replay = create(stack.url, model="fake:echo", prompt="a",
                    headers={"Idempotency-Key": "once"})
    assert replay["id"] == first["id"]
    create(stack.url, model="fake:echo", prompt="b")
    refused = httpx.post(f"{stack.url}/v1/generations", json={"model": "nobody:x", "prompt": "c"},
                         timeout=10)
    assert refused.status_code == 400
    completion = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30, json={
        "model": "fake:echo", "messages": [{"role": "user", "content": "d"}]})
    assert completion.status_code == 200, completion.text
    assert _created(stack.url) - before == 3
