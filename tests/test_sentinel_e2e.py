"""The queue's Redis under Sentinel: its primary is killed mid-run and every generation
still completes (real redis-server processes: a primary, a replica, three Sentinels)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.client import status
from tests.stack import Stack, wait_for
from tokenrelay.cli.redis_server import RedisServer, free_port, redis_server_binary

pytestmark = pytest.mark.slow  # starts real processes

MASTER = "queue"


@dataclass
class Sentinels:
    primary: RedisServer
    replica: subprocess.Popen[bytes]
    replica_port: int
    ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{MASTER}"

    def primary_port(self) -> int:
        client = redis.Redis(port=self.ports[0])
        try:
            _host, port = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
            return int(port)
        finally:
            client.close()

    def ready(self) -> bool:
        """Every Sentinel knows the replica and the two other Sentinels."""
        for port in self.ports:
            client = redis.Redis(port=port)
            try:
                replicas = client.execute_command("SENTINEL", "replicas", MASTER)
                others = client.execute_command("SENTINEL", "sentinels", MASTER)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if len(replicas) != 1 or len(others) != 2:
                return False
        return True


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    binary = redis_server_binary()
    primary = RedisServer().start()
    replica_port = free_port()
    replica = subprocess.Popen(
        [binary, "--port", str(replica_port), "--bind", "127.0.0.1", "--save", "",
         "--dir", str(tmp_path), "--replicaof", "127.0.0.1", str(primary.port),
         "--loglevel", "warning"], stdout=subprocess.DEVNULL)
    group = Sentinels(primary, replica, replica_port, [free_port() for _ in range(3)])
    try:
        for port in group.ports:
            conf = tmp_path / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n")
            group.processes.append(subprocess.Popen(
                [binary, str(conf), "--sentinel", "--loglevel", "warning"],
                stdout=subprocess.DEVNULL))
        wait_for(group.ready, 30, 0.2, "Sentinels that know the replica and each other")
        yield group
    finally:
        for proc in [*group.processes, replica]:
            proc.terminate()
            proc.wait(10)
        primary.stop()


REFUSED: list[float] = []  # when a create was answered 503 (the queue unavailable)


def _create(url: str, prompt: str) -> str:
    """Create a generation, retrying while the queue is unavailable (503 + Retry-After)."""
    deadline = time.monotonic() + 30
    while True:
        response = httpx.post(f"{url}/v1/generations", timeout=10,
                              json={"model": "fake:lorem", "prompt": prompt, "max_tokens": 20})
        if response.status_code == 202:
            gen_id: str = response.json()["id"]
            return gen_id
        assert response.status_code == 503, response.text
        REFUSED.append(time.monotonic())
        assert time.monotonic() < deadline, "the queue did not come back"
        time.sleep(float(response.headers.get("retry-after", "0.2")) / 10)


def test_generations_complete_through_a_failover_of_the_queue(sentinels: Sentinels) -> None:
    """Generations created before, during and after the kill -9 of the queue's primary all
    complete; the figures (time to recover, generations lost) are printed."""
    stack = Stack(apis=1, workers=2, env={"TOKENRELAY_QUEUE_REDIS_URL": sentinels.url,
                                          "TOKENRELAY_FAKE_TPS": "40"})
    try:
        gen_ids = [_create(stack.url, f"before {i}") for i in range(10)]
        old_port = sentinels.primary.port
        killed_at = time.monotonic()
        sentinels.primary.process.kill()  # type: ignore[union-attr]
        # Keep creating through the failover; each create is retried until accepted.
        recovered_at = None
        while time.monotonic() - killed_at < 8 or recovered_at is None:
            gen_ids.append(_create(stack.url, f"during {len(gen_ids)}"))
            if recovered_at is None and sentinels.primary_port() != old_port:
                recovered_at = time.monotonic()
            assert time.monotonic() - killed_at < 60, "no failover within 60 s"
        gen_ids += [_create(stack.url, f"after {i}") for i in range(10)]

        def ended() -> bool:
            return all(status(stack.url, g)["status"] in ("completed", "failed", "cancelled")
                       for g in gen_ids)

        wait_for(ended, 60, 0.2, "every generation ended")
        finals = [status(stack.url, g) for g in gen_ids]
        lost = [f["id"] for f in finals if f["status"] != "completed"]
        unavailable = max(REFUSED, default=killed_at) - killed_at
        print(f"\nsentinel failover: primary replaced {recovered_at - killed_at:.2f}s after "
              f"kill -9; creates refused (503) for {unavailable:.2f}s ({len(REFUSED)} retries); "
              f"{len(gen_ids)} generations, lost {len(lost)}")
        assert sentinels.primary_port() == sentinels.replica_port
        assert lost == []
        assert all(f["content"] for f in finals)
    finally:
        stack.stop()
