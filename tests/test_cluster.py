"""Past one machine: streams on a local 3-master Redis Cluster, the queue on its own Redis.

The core acceptance tests of tests/test_core_e2e.py run here unchanged against a
deployment with TOKENRELAY_REDIS_CLUSTER=true and TOKENRELAY_QUEUE_REDIS_URL set
(their ``stack``/``stack2``/``openai_stack`` fixtures are redefined below).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import redis
from redis.cluster import RedisCluster

from tests import test_core_e2e as core
from tests.client import collect, create, status, text_of
from tests.fake_upstream import Record, fake_upstream
from tests.stack import Stack, wait_for
from tokenrelay.cli.redis_server import RedisServer, free_port, redis_server_binary

# The core acceptance, on the cluster: content equality, resume, multi-viewer identity,
# cancel (mid-stream, closing the upstream; after the end), error.
pytestmark = pytest.mark.slow  # starts real processes


test_delta_content_equals_status_content = core.test_delta_content_equals_status_content
test_resume_after_every_k_on_either_api_process = (
    core.test_resume_after_every_k_on_either_api_process)
test_twenty_viewers_on_two_api_processes_see_identical_events = (
    core.test_twenty_viewers_on_two_api_processes_see_identical_events)
test_fake_error_ends_with_exactly_one_error_event = core.test_fake_error_ends_with_exactly_one_error_event
test_openai_provider_streams_with_usage = core.test_openai_provider_streams_with_usage
test_cancel_mid_stream_closes_the_upstream_connection = (
    core.test_cancel_mid_stream_closes_the_upstream_connection)
test_cancel_after_the_end_is_409 = core.test_cancel_after_the_end_is_409
test_post_with_accept_event_stream_streams_in_one_call = (
    core.test_post_with_accept_event_stream_streams_in_one_call)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class LocalCluster:
    """Three redis-servers with --cluster-enabled, joined by redis-cli --cluster create."""

    def __init__(self, masters: int = 3):
        self.ports = [_cluster_port() for _ in range(masters)]
        self.dir = Path(tempfile.mkdtemp(prefix="tokenrelay-cluster-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> LocalCluster:
        binary = redis_server_binary()
        cli = Path(binary).with_name("redis-cli")
        cli_path = str(cli) if cli.exists() else shutil.which("redis-cli")
        if cli_path is None:
            pytest.skip("no redis-cli to create the cluster")
        for port in self.ports:
            node_dir = self.dir / str(port)
            node_dir.mkdir()
            self.procs.append(subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--save", "", "--appendonly", "no", "--protected-mode", "no",
                 "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        for port in self.ports:
            wait_for(lambda p=port: _pings(p), 10, what=f"cluster node {port}")
        created = subprocess.run(
            [cli_path, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        for port in self.ports:
            wait_for(lambda p=port: _cluster_ok(p), 30, what=f"cluster state ok on {port}")
        return self

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pings(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1) as client:
        info = client.execute_command("CLUSTER INFO")
    if isinstance(info, dict):  # redis-py parses the reply
        return info.get("cluster_state") in ("ok", b"ok")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A local 3-master Redis Cluster, removed after the module."""
    c = LocalCluster().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def queue_redis() -> Iterator[RedisServer]:
    """The queue's own plain Redis (arq has no Cluster support)."""
    server = RedisServer().start()
    yield server
    server.stop()


def _cluster_env(queue_redis: RedisServer) -> dict[str, str]:
    return {"TOKENRELAY_REDIS_CLUSTER": "true", "TOKENRELAY_QUEUE_REDIS_URL": queue_redis.url}


@pytest.fixture(scope="module")
def stack2(cluster: LocalCluster, queue_redis: RedisServer) -> Iterator[Stack]:
    """Two API processes and two workers: streams on the cluster, the queue apart."""
    s = Stack(apis=2, workers=2, redis_url=cluster.url, env=_cluster_env(queue_redis))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stack(stack2: Stack) -> Stack:
    return stack2


@pytest.fixture(scope="module")
def openai_stack(cluster: LocalCluster) -> Iterator[tuple[Stack, Record]]:
    """A deployment with the fake OpenAI upstream: same cluster, a queue of its own (so the
    other deployment's workers, which lack the upstream, never take its jobs)."""
    queue = RedisServer().start()
    with fake_upstream() as (base_url, record):
        s = Stack(apis=1, workers=1, redis_url=cluster.url, env={
            **_cluster_env(queue),
            "TOKENRELAY_OPENAI_BASE_URL": base_url, "TOKENRELAY_OPENAI_API_KEY": "test-key",
        })
        try:
            yield s, record
        finally:
            s.stop()
            queue.stop()


def test_generations_spread_over_the_shards_and_stream_from_one_api(
    stack2: Stack, cluster: LocalCluster,
) -> None:
    """Generations land on several masters, each one's keys in one slot, and one API process
    streams them all at once (its hub reads per slot: one XREAD cannot cross slots)."""
    gens = [create(stack2.urls[0], model="fake:lorem", prompt="x", max_tokens=30)
            for _ in range(12)]
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        nodes = set()
        for gen in gens:
            slots = {client.keyslot(f"tr:{{{gen['id']}}}:{part}")
                     for part in ("events", "meta", "content")}
            assert len(slots) == 1
            node = client.get_node_from_key(f"tr:{{{gen['id']}}}:events")
            nodes.add((node.host, node.port))
        assert len(nodes) >= 2, nodes
        assert client.exists("tr:queue") == 0, "the queue must not be on the cluster"
    finally:
        client.close()
    with ThreadPoolExecutor(len(gens) * 2) as pool:
        viewers = [pool.submit(collect, stack2.urls[0], g["id"]) for g in gens for _ in range(2)]
        results = [v.result(timeout=60) for v in viewers]
    for i, gen in enumerate(gens):
        final = status(stack2.urls[1], gen["id"])
        assert final["status"] == "completed"
        for events in results[2 * i: 2 * i + 2]:
            assert text_of(events) == final["content"]
            assert len(final["content"].split()) == 30


def test_viewers_of_generations_on_several_shards_count_from_both_api_processes(
    stack2: Stack,
) -> None:
    """Presence on a Cluster: one process's batch spans the masters (a pipeline per node),
    and `viewers` of each generation counts the viewers of both API processes."""
    gens = [create(stack2.url, model="fake:lorem", prompt="x", max_tokens=300)["id"]
            for _ in range(6)]
    with ExitStack() as streams:
        for index, gen_id in enumerate(gens):
            for base in stack2.urls[: 1 + index % 2]:
                client = streams.enter_context(httpx.Client(timeout=10))
                response = streams.enter_context(
                    client.stream("GET", f"{base}/v1/generations/{gen_id}/events"))
                assert response.status_code == 200
        for index, gen_id in enumerate(gens):
            wait_for(lambda g=gen_id, n=1 + index % 2: status(stack2.url, g)["viewers"] == n,
                     10, 0.05, f"{1 + index % 2} viewers of {gen_id}")
    for gen_id in gens:
        wait_for(lambda g=gen_id: status(stack2.urls[1], g)["viewers"] == 0, 10, 0.05,
                 "no viewer")


def test_queue_and_control_live_on_the_queue_redis(
    stack2: Stack, queue_redis: RedisServer,
) -> None:
    """The arq job of a generation is on TOKENRELAY_QUEUE_REDIS_URL, not on the cluster."""
    gen = create(stack2.url, model="fake:echo", prompt="where is my job")
    assert text_of(collect(stack2.url, gen["id"])) == "where is my job"
    client = redis.Redis.from_url(queue_redis.url)
    try:
        # arq stores the result just after the job returns, so just after the last event.
        wait_for(lambda: client.exists(f"arq:result:{gen['id']}") == 1, 10,
                 what="the job's result on the queue's Redis")
    finally:
        client.close()


def test_readyz_needs_the_queue_redis_too(cluster: LocalCluster) -> None:
    """With the queue on its own Redis, /readyz answers 503 while that Redis is down, 200 after."""
    queue = RedisServer().start()
    s = Stack(apis=1, workers=0, redis_url=cluster.url, env=_cluster_env(queue))
    try:
        assert httpx.get(f"{s.url}/readyz", timeout=10).status_code == 200
        queue._terminate()
        wait_for(lambda: httpx.get(f"{s.url}/readyz", timeout=10).status_code == 503, 20,
                 what="readyz 503 without the queue's Redis")
        queue.start()
        wait_for(lambda: httpx.get(f"{s.url}/readyz", timeout=10).status_code == 200, 20,
                 what="readyz 200 again")
    finally:
        s.stop()
        queue.stop()
