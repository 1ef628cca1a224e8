"""Fan-out against nginx + nchan (Redis storage), alternately in the same sitting.

    python bench/nchan.py                      # N = 1,000 viewers, 500 events at 50/s, 3 rounds
    python bench/nchan.py --n 1000 --tokens 500 --rounds 3 --quiet-wait 120

One channel, 50 events/s, every viewer connected before the first event. Each
round runs tokenrelay's scenario a (bench/scenarios.py: one held generation, one
API process, one worker) and then the same load on nginx with Debian's
libnginx-mod-nchan (one nginx process, ``nchan_redis_pass`` to its own private
redis-server), read by the same load client (bench/sseclient.py). nchan's
messages carry their publish time as ``ms-seq`` in the data, so latency is
measured the same way as tokenrelay's (client clock − append/publish time) and
loss and duplicates are counted against the published list. The module is
installed with apt-get when it is missing (root only). Figures go to
``bench/results/nchan.json``; the ratios tokenrelay / nchan are per round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    CpuMeter,
    Stack,
    install_uvloop,
    machine_note,
    save,
    summary,
    wait_for_quiet,
    wait_until,
)
from bench.loadrun import FanoutResult, account, fanout, tokenrelay_server  # noqa: E402
from bench.scenarios import FANOUT_ENV  # noqa: E402
from bench.sseclient import SEQ_BITS, open_many, request_bytes  # noqa: E402
from tokenrelay.cli.redis_server import RedisServer, free_port  # noqa: E402

MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NGINX = Path("/usr/sbin/nginx")
CHANNEL = "bench"


def ensure_nchan() -> None:
    """Debian's nginx and its nchan module, installed if missing (needs root and apt)."""
    if MODULE.exists() and NGINX.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit("nchan is missing: apt-get install nginx libnginx-mod-nchan")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx", "libnginx-mod-nchan"],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def nchan_conf(workdir: Path, port: int, redis_port: int) -> str:
    """One nginx process (as tokenrelay runs one API process), nchan on Redis storage."""
    return f"""load_module {MODULE};
daemon off;
master_process off;
worker_rlimit_nofile 65536;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp;
    scgi_temp_path {workdir}/tmp;
    upstream redis_storage {{ nchan_redis_server "redis://127.0.0.1:{redis_port}"; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /pub {{
            nchan_publisher;
            nchan_channel_id {CHANNEL};
            nchan_redis_pass redis_storage;
        }}
        location = /sub {{
            nchan_subscriber eventsource;
            nchan_channel_id {CHANNEL};
            nchan_subscriber_first_message newest;
            nchan_redis_pass redis_storage;
        }}
    }}
}}
"""


class Nchan:
    """nginx + nchan and its private redis-server, started for one run."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="tr-nchan-"))
        (self.workdir / "tmp").mkdir()
        self.redis = RedisServer()
        self.redis.start()
        self.port = free_port()
        conf = self.workdir / "nginx.conf"
        conf.write_text(nchan_conf(self.workdir, self.port, self.redis.port))
        subprocess.run([str(NGINX), "-t", "-c", str(conf)], check=True, capture_output=True)
        self.proc = subprocess.Popen([str(NGINX), "-c", str(conf)], stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{self.url}/pub", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"nginx did not start: {self.workdir}/error.log") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


async def publish(url: str, tokens: int, rate: float, published: list[int]) -> None:
    """``tokens`` deltas then ``done`` at ``rate``/s; each carries its publish time."""
    async with httpx.AsyncClient(timeout=10) as client:
        start = time.monotonic()
        for seq in range(tokens + 1):
            await asyncio.sleep(max(0.0, start + seq / rate - time.monotonic()))
            ms = int(time.time() * 1000)
            published.append(ms << SEQ_BITS | seq)
            etype = "done" if seq == tokens else "delta"
            response = await client.post(f"{url}/pub", content=f"{ms}-{seq}",
                                         headers={"X-EventSource-Event": etype})
            response.raise_for_status()


async def nchan_fanout(nchan: Nchan, n: int, tokens: int) -> FanoutResult:
    """The same load as scenario a: ``n`` viewers connected first, then 50 events/s."""
    host, port = "127.0.0.1", nchan.port
    request = request_bytes("GET", "/sub", f"{host}:{port}")
    latencies: array = array("d")  # type: ignore[type-arg]
    t0 = time.monotonic()
    pairs = await open_many(n, host, port, lambda i: request, latencies)
    viewers = [v for v, _ in pairs]
    await wait_until(lambda: all(v.status or v.error for v in viewers), 120,
                     f"{n} nchan viewers to connect")
    connect_s = time.monotonic() - t0
    pids = {"server": nchan.proc.pid}
    if nchan.redis.process is not None:
        pids["redis"] = nchan.redis.process.pid
    published: list[int] = []
    cpu = CpuMeter(pids).start()
    await publish(nchan.url, tokens, 50.0, published)
    try:
        await wait_until(lambda: all(v.terminal or v.error for v in viewers), 30,
                         "every nchan viewer to get the last event")
    except TimeoutError:
        pass  # counted below as incomplete
    cpu_result = cpu.stop()
    for _, proto in pairs:
        proto.close()
    lost, duplicates, incomplete = account(viewers, published)
    errors = [v.error for v in viewers if v.error]
    return FanoutResult(
        server="nchan", n=n, events=len(published), latency=summary(latencies), lost=lost,
        duplicates=duplicates, incomplete=incomplete, errors=errors[:5], cpu=cpu_result,
        connect_s=connect_s,
    )


def server_cpu(result: FanoutResult) -> float:
    """CPU of what serves the viewers: the API process, or nginx (Redis apart in both)."""
    return result.cpu.get("server", 0.0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_nchan()
    print(f"fan-out, tokenrelay vs nginx+nchan: N = {args.n}, {args.tokens} events at 50/s, "
          f"{args.rounds} rounds ({machine_note()})", flush=True)
    stack = Stack(apis=1, workers=0, env=FANOUT_ENV)
    nchan = Nchan()
    rounds: list[dict[str, Any]] = []
    try:
        server = tokenrelay_server(stack)
        for i in range(args.rounds):
            ours = await fanout(stack, server, args.n, args.tokens)
            print("  " + ours.line(), flush=True)
            theirs = await nchan_fanout(nchan, args.n, args.tokens)
            print("  " + theirs.line(), flush=True)
            ratio_p99 = ours.latency["p99"] / theirs.latency["p99"]
            ratio_cpu = server_cpu(ours) / max(server_cpu(theirs), 1e-9)
            print(f"  round {i + 1}: p99 tokenrelay/nchan {ratio_p99:.2f} x, "
                  f"server CPU {ratio_cpu:.2f} x", flush=True)
            rounds.append({"tokenrelay": ours.__dict__, "nchan": theirs.__dict__,
                           "p99_ratio": ratio_p99, "cpu_ratio": ratio_cpu})
    finally:
        nchan.stop()
        stack.stop()
    p99 = statistics.median(r["p99_ratio"] for r in rounds)
    cpu = statistics.median(r["cpu_ratio"] for r in rounds)
    print(f"median over {len(rounds)} rounds: p99 {p99:.2f} x, server CPU {cpu:.2f} x "
          f"(targets: p99 <= 1.0 x, CPU <= 1.5 x)")
    return {"n": args.n, "tokens": args.tokens, "rounds": rounds,
            "median_p99_ratio": p99, "median_cpu_ratio": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-wait", type=float, default=0.0)
    args = parser.parse_args()
    if args.quiet_wait:
        print(wait_for_quiet(args.quiet_wait))
    install_uvloop()
    save("nchan", asyncio.run(run(args)))


if __name__ == "__main__":
    main()
