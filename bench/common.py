"""What every benchmark shares: the stack it measures, percentiles, CPU and Redis counters.

Everything runs on loopback against a private redis-server (never the machine's
own Redis), and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.stack import Stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def install_uvloop() -> None:
    """The load client runs on uvloop when it is there (it is, with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def summary(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else math.nan,
    }


def fmt_ms(stats: dict[str, float]) -> str:
    return (f"p50 {stats['p50']:.1f} ms  p90 {stats['p90']:.1f} ms  "
            f"p99 {stats['p99']:.1f} ms  max {stats['max']:.1f} ms  (n={stats['n']})")


class CpuMeter:
    """CPU seconds used by a set of processes (and this one) between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.procs["client"] = psutil.Process(os.getpid())
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self.result: dict[str, float] = {}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return float(times.user + times.nice + times.system + times.irq + times.softirq)

    @staticmethod
    def _steal() -> float:
        """Time this virtual machine's CPUs were runnable but the host ran something else."""
        return float(getattr(psutil.cpu_times(), "steal", 0.0))

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._c0 = {name: self._cpu(p) for name, p in self.procs.items()}
        self._busy0 = self._busy()
        self._steal0 = self._steal()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        self.result = {
            name: (self._cpu(p) - self._c0[name]) / wall for name, p in self.procs.items()
        }
        # Everything else the machine ran meanwhile (other people's tests: the noise).
        busy = (self._busy() - self._busy0) / wall
        self.result["others"] = max(0.0, busy - sum(self.result.values()))
        # Noise a load average does not show: the host's other tenants (a share of one core).
        self.result["steal"] = (self._steal() - self._steal0) / wall
        self.result["wall_s"] = wall
        return self.result

    def describe(self) -> str:
        parts = [f"{name} {share * 100:.0f}%" for name, share in self.result.items()
                 if name != "wall_s"]
        return "CPU (share of one core): " + ", ".join(parts)


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def stack_pids(stack: Stack) -> dict[str, int]:
    pids = {f"api{i}": p.pid for i, p in enumerate(stack.apis)}
    pids.update({f"worker{i}": p.pid for i, p in enumerate(stack.workers)})
    if stack.redis is not None and stack.redis.process is not None:
        pids["redis"] = stack.redis.process.pid
    return pids


def host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1]
    host, _, port = rest.partition(":")
    return host, int(port.split("/")[0])


async def wait_until(predicate: Any, within: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` (sync) until truthy; raise after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def save(name: str, data: dict[str, Any]) -> Path:
    """Keep a run's figures as JSON (bench/results/NAME.json) for the docs and the plot.

    Every run is also appended to bench/results/history.jsonl: on a shared machine
    runs differ with what else it runs, and the docs say which run they quote.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"), "scenario": name,
            "loadavg": os.getloadavg()[0], **data}
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    with (RESULTS / "history.jsonl").open("a") as history:
        history.write(json.dumps(data, default=float) + "\n")
    return path


def wait_for_quiet(max_wait_s: float = 0.0, busy_below: float = 0.3, window_s: float = 3.0) -> str:
    """Wait (at most ``max_wait_s``) until the machine's other work is below ``busy_below``
    cores over ``window_s``: on a shared machine, a measurement taken while someone
    else's test suite runs measures that suite too. Returns what was seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = psutil.cpu_times()
        time.sleep(window_s)
        after = psutil.cpu_times()
        busy = sum(getattr(after, f) - getattr(before, f)
                   for f in ("user", "nice", "system", "irq", "softirq")) / window_s
        if busy < busy_below or time.monotonic() >= deadline:
            return f"machine busy {busy:.2f} cores before the run"
        time.sleep(2.0)


def machine_note() -> str:
    load1, _, _ = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {load1:.2f} at start"
