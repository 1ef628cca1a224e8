"""The deployment files: compose.yaml against the compose-spec schema (offline), its topology,
and deploy/nginx.conf run for real (Debian's nginx) in front of two API processes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from httpx_sse import connect_sse

from tests.client import collect, create, status, text_of
from tests.stack import ROOT, Stack, wait_for
from tokenrelay.cli.redis_server import free_port

pytestmark = pytest.mark.slow  # starts real processes


COMPOSE = ROOT / "compose.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with its vendored compose-spec schema: no network needed."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)],
        capture_output=True, text=True, timeout=120,
    )


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_file_passes_the_compose_spec_schema() -> None:
    """compose.yaml validates against the compose-spec JSON schema that check-jsonschema vendors."""
    result = _lint(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "broken",
    [
        "servics:\n  api:\n    image: x\n",
        "services:\n  api:\n    image: x\n    healthcheck:\n      intervall: 5s\n",
        "services:\n  api:\n    image: x\n    deploy:\n      replicas: [2]\n",
    ],
)
def test_schema_lint_rejects_a_broken_compose_file(tmp_path: Path, broken: str) -> None:
    """The same linter fails a misspelt key or a wrongly typed value, so the check above can fail."""
    path = tmp_path / "compose.yaml"
    path.write_text(broken)
    result = _lint(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Schema validation errors" in result.stdout


def test_compose_topology_is_the_documented_one() -> None:
    """Redis with AOF, two API replicas behind nginx, two workers; healthchecks and restarts throughout."""
    services = _compose()["services"]
    assert set(services) == {"redis", "api", "worker", "proxy"}
    for name, service in services.items():
        assert service.get("restart") in ("unless-stopped", "always"), name
        assert service["healthcheck"]["test"], name
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for name in ("api", "worker"):
        assert services[name]["deploy"]["replicas"] == 2
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["environment"]["TOKENRELAY_REDIS_URL"].startswith("redis://redis:")
    assert services["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert any(v.startswith("./deploy/nginx.conf:") for v in services["proxy"]["volumes"])
    assert "ports" not in services["api"], "API replicas are reached through the proxy only"


def test_compose_sets_no_known_signing_secret() -> None:
    """An unset signing secret stays empty (a random shared one), never a guessable default."""
    env = _compose()["services"]["api"]["environment"]
    assert env["TOKENRELAY_SIGNING_SECRET"] in ("${TOKENRELAY_SIGNING_SECRET:-}",
                                                "${TOKENRELAY_SIGNING_SECRET}")


def test_nginx_conf_turns_buffering_off_and_reads_long() -> None:
    """nginx passes SSE bytes at once and waits far longer than the heartbeat between them."""
    conf = NGINX_CONF.read_text()
    assert re.search(r"^\s*proxy_buffering off;", conf, re.M)
    assert re.search(r"^\s*proxy_http_version 1\.1;", conf, re.M)
    read_timeout = re.search(r"^\s*proxy_read_timeout (\d+)s;", conf, re.M)
    assert read_timeout is not None and int(read_timeout.group(1)) >= 4 * 15


def test_nginx_allows_many_open_streams() -> None:
    """nginx is given far more than its default 1,024 connections per worker, and is mounted
    as the main config (where that limit is set)."""
    conf = NGINX_CONF.read_text()
    connections = re.search(r"^\s*worker_connections (\d+);", conf, re.M)
    assert connections is not None and int(connections.group(1)) >= 8192
    proxy = _compose()["services"]["proxy"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert proxy["ulimits"]["nofile"]["soft"] >= 2 * int(connections.group(1))


# --- the same nginx.conf, run for real in front of two API processes -------------------


def _loopback_conf(api_ports: list[int], listen: int, workdir: Path) -> str:
    """deploy/nginx.conf unchanged but for its addresses, log, pid and temporary paths."""
    conf = NGINX_CONF.read_text()
    servers = " ".join(f"server 127.0.0.1:{port};" for port in api_ports)
    replaced = {
        "server api:8000;": servers,
        "listen 80;": f"listen 127.0.0.1:{listen};",
        "access_log /var/log/nginx/access.log;": "access_log off;",
    }
    for old, new in replaced.items():
        assert conf.count(old) == 1, old
        conf = conf.replace(old, new)
    temp = {name: workdir / name for name in ("client", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir()
    conf = conf.replace("http {", f"""http {{
    client_body_temp_path {temp['client']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};""", 1)
    return f"""daemon off;
master_process off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
{conf}"""


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[Stack, str]]:
    """Two API processes and a worker behind Debian's nginx running deploy/nginx.conf."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    stack = Stack(apis=2, workers=1, env={"TOKENRELAY_FAKE_TPS": "20"})
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-nginx-"))
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(_loopback_conf(stack.ports, port, workdir))
    checked = subprocess.run([nginx, "-t", "-c", str(conf)], capture_output=True, text=True)
    proc = None
    try:
        assert checked.returncode == 0, checked.stderr
        proc = subprocess.Popen([nginx, "-c", str(conf)], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        stack.wait_ready(url)
        yield stack, url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_nginx_passes_events_while_the_generation_runs(proxied: tuple[Stack, str]) -> None:
    """Through nginx a viewer gets the first delta while the generation is still running (no buffering)."""
    stack, url = proxied
    gen = create(url, model="fake:lorem", prompt="x", max_tokens=60)  # 3 s at 20 words/s
    with httpx.Client(timeout=30) as client, connect_sse(
        client, "GET", f"{url}/v1/generations/{gen['id']}/events"
    ) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        first_delta = next(s for s in source.iter_sse() if s.event == "delta")
        seen_while = status(stack.url, gen["id"])["status"]
    assert first_delta.data
    assert seen_while == "running"


def _viewers(api_url: str) -> float:
    text = httpx.get(f"{api_url}/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("tokenrelay_viewers "))
    return float(line.split()[1])


def test_nginx_sends_all_viewers_of_a_generation_to_one_api(
    proxied: tuple[Stack, str],
) -> None:
    """Through nginx, six viewers of one generation all land on the same API process."""
    stack, url = proxied
    gen = create(url, model="fake:lorem", prompt="x", max_tokens=80)  # 4 s at 20 words/s
    with ThreadPoolExecutor(6) as pool:
        viewers = [pool.submit(collect, url, gen["id"]) for _ in range(6)]
        counts = wait_for(
            lambda: (c := [_viewers(u) for u in stack.urls]) and sum(c) == 6 and c,
            20, what="six viewers connected")
        results = [v.result(timeout=60) for v in viewers]
    assert sorted(counts) == [0, 6], counts
    assert all(text_of(r) == status(url, gen["id"])["content"] for r in results)


def test_nginx_answers_503_in_the_error_shape_when_no_api_is_up(
    proxied: tuple[Stack, str],
) -> None:
    """With every API process down nginx answers 503 with Retry-After and the JSON error body."""
    stack, url = proxied
    for api in stack.apis:
        api.stop()
    response = httpx.get(f"{url}/v1/generations/gen_00000000000000000000000000000000",
                         timeout=10)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["code"] == "unavailable"
