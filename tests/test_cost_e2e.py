"""Cost end to end: PRICES -> `cost` in `done`, the status, thread totals and /v1/usage, with
totals equal to the sum over 50 concurrent generations (two API processes, two workers)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.client import collect, status
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.slow  # starts real processes

ACME = {"Authorization": "Bearer k-acme"}
GLOBEX = {"Authorization": "Bearer k-globex"}
PRICES = {"fake:echo": [1.25, 2.5], "lorem": [0.15, 0.6]}  # "lorem": any provider's lorem
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack(apis=2, workers=2, env={"TOKENRELAY_API_KEYS": "acme:k-acme,globex:k-globex",
                                      "TOKENRELAY_PRICES": json.dumps(PRICES)})
    yield s
    s.stop()


def expected_cost(model: str, usage: dict[str, Any]) -> float:
    price_in, price_out = PRICES.get(model) or PRICES[model.partition(":")[2]]
    return float(usage["prompt_tokens"] * price_in + usage["completion_tokens"] * price_out) / 1e6


def test_totals_per_thread_and_tenant_are_the_sums_of_fifty_generations(stack: Stack) -> None:
    """50 generations at once over both API processes (30 alone, 20 in two threads, enqueued):
    each one's cost follows PRICES, and the thread and tenant totals are exactly their sums."""
    threads = [httpx.post(f"{url}/v1/threads", json={"model": "fake:echo"}, headers=ACME,
                          timeout=10).json()["id"] for url in stack.urls]

    def start(i: int) -> tuple[str, str | None]:
        base = stack.urls[i % 2]
        if i < 30:
            model = ("fake:echo", "fake:lorem", "fake:error")[i % 3]
            body = {"model": model, "prompt": f"say {'word ' * (i % 7)}{i}", "max_tokens": 12}
            response = httpx.post(f"{base}/v1/generations", json=body, headers=ACME, timeout=30)
            return response.json()["id"], None
        thread_id = threads[i % 2]
        response = httpx.post(f"{base}/v1/threads/{thread_id}/messages", headers=ACME,
                              json={"content": f"turn {i}", "if_busy": "enqueue"}, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["id"], thread_id

    with ThreadPoolExecutor(25) as pool:
        started = list(pool.map(start, range(50)))

    def ended(gen_id: str) -> dict[str, Any] | None:
        found = status(stack.urls[1], gen_id, ACME)
        return found if found["status"] not in ("queued", "running") else None

    final = {gen_id: wait_for(lambda g=gen_id: ended(g), 60, 0.1, "the end")
             for gen_id, _ in started}
    priced = [s for s in final.values() if s["status"] == "completed"]
    assert len(priced) == 40 and all(s["status"] == "failed" for s in final.values()
                                     if s["model"] == "fake:error")
    for found in priced:
        assert found["usage"]["cost"] == pytest.approx(
            expected_cost(found["model"], found["usage"]), rel=1e-12)
    # fake:error fails after streaming some text: what it produced is estimated and counted
    # (it has no price, so no cost).
    cut = [s for s in final.values() if s["status"] == "failed"]
    assert all(s["usage"]["estimated"] and "cost" not in s["usage"] for s in cut)

    usage = httpx.get(f"{stack.url}/v1/usage", headers=ACME, timeout=10).json()
    for name in TOKEN_FIELDS:
        assert usage[name] == sum(s["usage"][name] for s in priced + cut)
    assert usage["cost"] == pytest.approx(sum(s["usage"]["cost"] for s in priced), abs=1e-12)
    assert usage["generations"]["completed"] == 40 and usage["generations"]["failed"] == 10

    for thread_id in threads:
        def settled(thread_id: str = thread_id) -> dict[str, Any] | None:
            body: dict[str, Any] = httpx.get(f"{stack.url}/v1/threads/{thread_id}",
                                             headers=ACME, timeout=10).json()
            return body if body["active_generation_id"] is None else None

        thread = wait_for(settled, 30, 0.1, "the thread's answers recorded")
        mine = [final[g] for g, t in started if t == thread_id]
        assert len(mine) == 10
        for name in TOKEN_FIELDS:
            assert thread["usage"][name] == sum(s["usage"][name] for s in mine)
        assert thread["cost"] == pytest.approx(sum(s["usage"]["cost"] for s in mine), abs=1e-12)
        assert thread["usage"]["cost"] == thread["cost"]
        answers = [m for m in thread["messages"] if m["role"] == "assistant"]
        assert [m["usage"]["cost"] for m in answers] == [
            final[m["generation_id"]]["usage"]["cost"] for m in answers]
        export = httpx.get(f"{stack.url}/v1/threads/{thread_id}", params={"format": "markdown"},
                           headers=ACME, timeout=10).text
        front = export.split("---")[1]
        assert float(front.split("\ncost: ")[1].split()[0]) == pytest.approx(thread["cost"])
        assert "e-" not in front  # no exponent: YAML 1.1 would read it as a string

    nothing = httpx.get(f"{stack.url}/v1/usage", headers=GLOBEX, timeout=10).json()
    assert nothing["cost"] is None and nothing["total_tokens"] == 0


def test_done_event_and_status_carry_the_cost(stack: Stack) -> None:
    """The `done` event's usage has the cost that PRICES gives, as the status shows it."""
    body = {"model": "fake:lorem", "prompt": "x", "max_tokens": 7}
    gen_id = httpx.post(f"{stack.urls[1]}/v1/generations", json=body, headers=GLOBEX,
                        timeout=10).json()["id"]
    done = collect(stack.url, gen_id, headers=GLOBEX)[-1]
    assert done.type == "done"
    assert done.data["usage"]["cost"] == pytest.approx(
        expected_cost("fake:lorem", done.data["usage"]), rel=1e-12)
    assert status(stack.url, gen_id, GLOBEX)["usage"] == done.data["usage"]


def test_an_answer_cancelled_mid_stream_still_counts_what_it_produced(stack: Stack) -> None:
    """The upstream bills the tokens it streamed before a cancel: the cancelled generation's
    status carries an estimated usage (characters / 4, marked so) priced by PRICES, and the
    tenant's totals grow by exactly that. A cancel before any output counts nothing."""
    before = httpx.get(f"{stack.url}/v1/usage", headers=GLOBEX, timeout=10).json()
    body = {"model": "fake:lorem", "prompt": "abcdefgh", "max_tokens": 5000}
    gen_id = httpx.post(f"{stack.url}/v1/generations", json=body, headers=GLOBEX,
                        timeout=10).json()["id"]
    seen = collect(stack.url, gen_id, headers=GLOBEX, limit=8)  # queued, running, 6 deltas
    assert seen[-1].type == "delta"
    cancel = httpx.post(f"{stack.urls[1]}/v1/generations/{gen_id}/cancel", headers=GLOBEX,
                        timeout=10)
    assert cancel.status_code == 202, cancel.text
    events = collect(stack.url, gen_id, headers=GLOBEX)
    assert events[-1].type == "cancelled"
    final = status(stack.url, gen_id, GLOBEX)
    usage = final["usage"]
    assert final["status"] == "cancelled" and final["content"]
    assert usage["estimated"] is True
    assert usage["completion_tokens"] == -(-len(final["content"]) // 4)
    assert usage["prompt_tokens"] == 2  # "abcdefgh": 8 characters
    assert usage["cost"] == pytest.approx(expected_cost("fake:lorem", usage), rel=1e-12)

    def counted() -> bool:
        now = httpx.get(f"{stack.url}/v1/usage", headers=GLOBEX, timeout=10).json()
        return now["generations"]["cancelled"] == before["generations"]["cancelled"] + 1
    wait_for(counted, 10, what="the cancelled generation in the tenant's totals")
    after = httpx.get(f"{stack.url}/v1/usage", headers=GLOBEX, timeout=10).json()
    for name in TOKEN_FIELDS:
        assert after[name] == before[name] + usage[name], name
    assert after["cost"] == pytest.approx((before["cost"] or 0) + usage["cost"], rel=1e-9)
