"""Losing any process: worker, API process or Redis. Nothing is lost, nothing duplicated."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.client import collect, create, follow, status, text_of
from tests.stack import Stack, wait_for
from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared.events import Event, parse_id

pytestmark = pytest.mark.slow  # starts real processes


def _running_worker_pid(stack: Stack, gen_id: str) -> int:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        entry = wait_for(lambda: client.hget("tr:running", gen_id), 10, what="a worker runs it")
    finally:
        client.close()
    worker_id, _attempt = entry.decode().split()
    return int(worker_id.split("-")[0])


def _deltas(events: list[Event]) -> int:
    return sum(e.type == "delta" for e in events)


def test_worker_killed_mid_generation_restarts_elsewhere() -> None:
    """kill -9 of the worker running a generation: another finishes it within 15 s, with `restarted`."""
    s = Stack(apis=1, workers=2, env={"TOKENRELAY_FAKE_TPS": "40"})
    try:
        gen = create(s.url, model="fake:lorem", prompt="x", max_tokens=120)
        seen: list[Event] = []
        viewer = ThreadPoolExecutor(1).submit(follow, s.urls, gen["id"], None, 60, seen.append)
        wait_for(lambda: _deltas(seen) >= 10, 10, what="10 deltas")
        pid = _running_worker_pid(s, gen["id"])
        victim = next(w for w in s.workers if w.pid == pid)
        killed_at = time.time()
        victim.kill()

        events = viewer.result(timeout=60)
        done_at = time.time()
        restarted = [e for e in events if e.data.get("status") == "restarted"]
        assert len(restarted) == 1
        detection_s = parse_id(restarted[0].id)[0] / 1000 - killed_at
        print(f"\nworker loss: restarted {detection_s:.2f}s after kill -9, "
              f"completed {done_at - killed_at:.2f}s after")
        assert events[-1].type == "done"
        assert done_at - killed_at < 15
        final = status(s.url, gen["id"])
        assert final["status"] == "completed"
        assert text_of(events) == final["content"]
        assert len(final["content"].split()) == 120
    finally:
        s.stop()


def test_worker_sigterm_hands_its_generation_over() -> None:
    """SIGTERM on a busy worker: after the grace period its generation continues on another worker."""
    s = Stack(apis=1, workers=2, env={"TOKENRELAY_FAKE_TPS": "40",
                                      "TOKENRELAY_WORKER_GRACE_S": "1"})
    try:
        gen = create(s.url, model="fake:lorem", prompt="x", max_tokens=200)
        seen: list[Event] = []
        viewer = ThreadPoolExecutor(1).submit(follow, s.urls, gen["id"], None, 60, seen.append)
        wait_for(lambda: _deltas(seen) >= 5, 10, what="5 deltas")
        pid = _running_worker_pid(s, gen["id"])
        victim = next(w for w in s.workers if w.pid == pid)
        victim.popen.send_signal(signal.SIGTERM)
        events = viewer.result(timeout=60)
        assert any(e.data.get("status") == "restarted" for e in events)
        assert events[-1].type == "done"
        assert text_of(events) == status(s.url, gen["id"])["content"]
        wait_for(lambda: not victim.alive(), 15, what="the worker to exit")
    finally:
        s.stop()


def test_api_process_killed_while_twenty_viewers_stream() -> None:
    """kill -9 of one of two API processes: its 20 viewers finish on the other, no loss, no duplicate."""
    s = Stack(apis=2, workers=1, env={"TOKENRELAY_FAKE_TPS": "30"})
    try:
        gen = create(s.url, model="fake:lorem", prompt="x", max_tokens=90)
        counts = [0] * 20
        lock = threading.Lock()

        def viewer(i: int) -> list[Event]:
            def seen(_: Event) -> None:
                with lock:
                    counts[i] += 1
            return follow(s.urls, gen["id"], on_event=seen)  # starts on urls[0]

        with ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(viewer, i) for i in range(20)]
            wait_for(lambda: min(counts) >= 10, 15, what="every viewer mid-stream")
            s.apis[0].kill()
            results = [f.result(timeout=60) for f in futures]
        reference = collect(s.urls[1], gen["id"])
        assert reference[-1].type == "done"
        for events in results:
            assert events == reference
        assert text_of(reference) == status(s.urls[1], gen["id"])["content"]
    finally:
        s.stop()


def test_redis_restart_mid_generation_recovers_without_restarting_anything() -> None:
    """Redis down then back (AOF on): readyz and creates say 503 meanwhile; the generation ends cleanly."""
    server = RedisServer(appendonly=True).start()
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_FAKE_TPS": "20"}, redis_url=server.url)
    try:
        gen = create(s.url, model="fake:lorem", prompt="x", max_tokens=60)
        seen: list[Event] = []
        viewer = ThreadPoolExecutor(1).submit(follow, s.urls, gen["id"], None, 90, seen.append)
        wait_for(lambda: _deltas(seen) >= 5, 10, what="5 deltas")

        server._terminate()
        wait_for(lambda: httpx.get(f"{s.url}/readyz").status_code == 503, 10, what="readyz 503")
        refused = httpx.post(f"{s.url}/v1/generations", json={"model": "fake:echo", "prompt": "x"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "redis_unavailable"
        assert int(refused.headers["retry-after"]) > 0
        server.start()

        wait_for(lambda: httpx.get(f"{s.url}/readyz").status_code == 200, 20, what="readyz 200")
        events = viewer.result(timeout=90)
        final = status(s.url, gen["id"])
        assert events[-1].terminal and [e.terminal for e in events].count(True) == 1
        if events[-1].type == "done":
            assert final["status"] == "completed"
        else:
            assert events[-1].type == "error" and events[-1].data["code"]
        assert text_of(events) == final["content"]
        again = create(s.url, model="fake:echo", prompt="after the restart")
        assert text_of(collect(s.url, again["id"])) == "after the restart"
        assert all(p.alive() for p in [*s.apis, *s.workers])
    finally:
        s.stop()
        server.stop()


def test_api_sigterm_ends_streams_with_a_reconnect_hint() -> None:
    """SIGTERM on an API process ends its open streams at once with `retry:`; viewers resume elsewhere."""
    s = Stack(apis=2, workers=1, env={"TOKENRELAY_FAKE_TPS": "30"})
    try:
        gen = create(s.url, model="fake:lorem", prompt="x", max_tokens=60)
        received = b""
        with httpx.stream("GET", f"{s.urls[0]}/v1/generations/{gen['id']}/events",
                          timeout=30) as response:
            for chunk in response.iter_bytes():
                received += chunk
                if received.count(b"event: delta") >= 5 and s.apis[0].alive():
                    s.apis[0].popen.send_signal(signal.SIGTERM)
        assert received.endswith(b": shutting down, reconnect\nretry: 250\n")
        wait_for(lambda: not s.apis[0].alive(), 10, what="the API process to exit")
        from tokenrelay.shared.events import parse_sse
        first = parse_sse(received.decode())
        rest = collect(s.urls[1], gen["id"], after=first[-1].id)
        assert first + rest == collect(s.urls[1], gen["id"])
        assert rest[-1].type == "done"
    finally:
        s.stop()
