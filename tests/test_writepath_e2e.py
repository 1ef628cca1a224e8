"""The worker's batched write path end to end: a fast upstream coalesced into one event per
window, and a worker killed while its batches are in flight (nothing lost, nothing twice)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import redis

from tests.client import collect, create, status, text_of
from tests.stack import Stack, wait_for
from tokenrelay.shared.events import parse_id
from tokenrelay.worker.providers.fake import LOREM

pytestmark = pytest.mark.slow  # starts real processes

WINDOW_MS = 25


def _lorem(words: int) -> str:
    return " ".join(itertools.islice(itertools.cycle(LOREM), words))


@pytest.fixture(scope="module")
def fast() -> Iterator[Stack]:
    """Two workers whose fake upstream streams 1,000 tokens/s, coalesced per 25 ms."""
    s = Stack(apis=1, workers=2, env={"TOKENRELAY_FAKE_TPS": "1000",
                                      "TOKENRELAY_COALESCE_MS": str(WINDOW_MS)})
    yield s
    s.stop()


def test_a_fast_upstream_gets_one_event_per_window_and_the_same_text(fast: Stack) -> None:
    """1,000 tokens at 1,000/s: a delta event at most every 25 ms, the text unchanged."""
    gen = create(fast.url, model="fake:lorem", prompt="x", max_tokens=1000)
    events = collect(fast.url, gen["id"])
    assert events[-1].type == "done"
    assert text_of(events) == status(fast.url, gen["id"])["content"] == _lorem(1000)
    times = [parse_id(e.id)[0] for e in events if e.type == "delta"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= WINDOW_MS - 2, gaps  # Redis's clock in ms, timers' granularity
    assert len(times) <= (times[-1] - times[0]) / WINDOW_MS + 2
    assert len(times) >= 20, "coalesced, not written all at the end"


def test_a_worker_killed_while_its_batches_stream_loses_and_duplicates_nothing(fast: Stack) -> None:
    """kill -9 of a worker while eight generations stream through its writer: every one
    ends once, its viewers' text and its stored content equal to the model's words."""
    words = 3000
    ids = [create(fast.url, model="fake:lorem", prompt="x", max_tokens=words)["id"]
           for _ in range(8)]
    client = redis.Redis.from_url(fast.redis_url)
    try:
        wait_for(lambda: all(client.xlen(f"tr:{{{g}}}:events") > 20 for g in ids), 20,
                 what="every generation streaming")
        owners = [client.hget("tr:running", g) for g in ids]
    finally:
        client.close()
    pids = [int(o.decode().split("-")[0]) for o in owners if o]
    victim = max(fast.workers, key=lambda w: pids.count(w.pid))
    assert pids.count(victim.pid) >= 1
    victim.kill()
    fast.add_worker()
    for gen_id in ids:
        events = collect(fast.url, gen_id, timeout=60)
        assert [e.type for e in events].count("done") == 1
        assert text_of(events) == status(fast.url, gen_id)["content"] == _lorem(words)
