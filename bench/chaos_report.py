"""The verdict of a chaos run (bench/chaos.py): the figures it checks and prints."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from tokenrelay.shared.events import Event, parse_id


@dataclass
class Report:
    config: dict[str, Any]
    generations: int = 0
    terminal: dict[str, int] = field(default_factory=dict)
    restarted_generations: int = 0
    viewers: int = 0
    viewers_text_equal: int = 0
    events_delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered_viewers: int = 0
    incomplete_viewers: int = 0
    drops: int = 0
    failed_connections: int = 0
    creates_refused: int = 0
    connect_p50_s: float = 0.0  # from opening a viewer's connection to its response headers
    connect_p99_s: float = 0.0
    # Age of each event when the viewer's client handled it (arrival minus the id's time):
    # large values mean the viewer was away (a drop, a fault) or the client fell behind.
    age_p50_s: float = 0.0
    age_p99_s: float = 0.0
    load_avg: list[float] = field(default_factory=list)  # the machine's 1-min load, start and end
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (sum(self.terminal.values()) == self.generations
                and self.viewers_text_equal == self.viewers
                and self.lost == self.duplicated == self.reordered_viewers == 0
                and self.incomplete_viewers == 0)

    def lines(self) -> list[str]:
        c = self.config
        f = self.faults
        api, worker, rds = f.get("api_kill", {}), f.get("worker_kill", {}), f.get(
            "redis_restart", {})
        terminal = ", ".join(f"{n} {t}" for t, n in sorted(self.terminal.items()))
        return [
            f"chaos: {c['generations']} generations x {c['viewers']} viewers, 3 API processes, "
            f"3 workers, Redis (AOF); {c['tokens']} words at {c['tps']:g}/s each, "
            f"created over {c['create_over_s']:g} s",
            f"generations: {sum(self.terminal.values())}/{self.generations} terminal "
            f"({terminal}); {self.restarted_generations} restarted after the worker kill",
            f"viewers: {self.viewers}; text equals status content: "
            f"{self.viewers_text_equal}/{self.viewers}; incomplete: {self.incomplete_viewers}",
            f"events delivered: {self.events_delivered}; lost: {self.lost}; "
            f"duplicated: {self.duplicated}; viewers out of order: {self.reordered_viewers}",
            f"resumes: {self.drops} random drops, {self.failed_connections} failed or refused "
            f"connections retried; creates refused and retried: {self.creates_refused}",
            f"event age at the viewer: p50 {self.age_p50_s:.3f} s, p99 {self.age_p99_s:.2f} s; "
            f"connection to response headers: p50 {self.connect_p50_s:.2f} s, p99 "
            f"{self.connect_p99_s:.2f} s; machine load average (1 min) at start and end: "
            f"{', '.join(f'{x:.1f}' for x in self.load_avg)} on {os.cpu_count()} cores",
            f"kill -9 API process at t={api.get('at_s', 0):.1f}s: {api.get('viewers', 0)} "
            f"viewers on it resumed elsewhere, next event after p50 {api.get('p50_s', 0):.2f} s, "
            f"max {api.get('max_s', 0):.2f} s; restarted process ready after "
            f"{api.get('ready_s', 0):.2f} s",
            f"kill -9 worker at t={worker.get('at_s', 0):.1f}s: {worker.get('generations', 0)} "
            f"generations running on it; `restarted` after p50 {worker.get('p50_s', 0):.2f} s, "
            f"max {worker.get('max_s', 0):.2f} s; next delta after max "
            f"{worker.get('delta_max_s', 0):.2f} s",
            f"Redis restart at t={rds.get('at_s', 0):.1f}s: down {rds.get('down_s', 0):.2f} s; "
            f"every API ready {rds.get('ready_s', 0):.2f} s after it returned; "
            f"{rds.get('streams', 0)} running streams appending again after p50 "
            f"{rds.get('p50_s', 0):.2f} s, max {rds.get('max_s', 0):.2f} s",
            f"wall time {self.wall_s:.1f} s; {'PASS' if self.ok else 'FAIL'}",
        ]


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def add_recovery(report: Report, faults: dict[str, dict[str, Any]],
                 streams: dict[str, list[Event]]) -> None:
    """Recovery times after each fault, from the streams' entry ids (when Redis wrote them)."""
    report.faults["api_kill"] = faults.get("api_kill", {})
    worker = dict(faults.get("worker_kill", {}))
    killed_at = worker.pop("killed_at", 0.0)
    restarts, deltas = [], []
    for gen_id in worker.pop("victims", []):
        events = streams[gen_id]
        at = next((i for i, e in enumerate(events) if e.data.get("status") == "restarted"),
                  None)
        if at is None:
            continue  # it ended before the reaper looked: nothing to restart
        restarts.append(parse_id(events[at].id)[0] / 1000 - killed_at)
        delta = next((e for e in events[at:] if e.type == "delta"), None)
        if delta is not None:
            deltas.append(parse_id(delta.id)[0] / 1000 - killed_at)
    worker.update(restarted=len(restarts), p50_s=p50(restarts),
                  max_s=max(restarts, default=0.0), delta_max_s=max(deltas, default=0.0))
    report.faults["worker_kill"] = worker
    redis_fault = dict(faults.get("redis_restart", {}))
    up_at = redis_fault.pop("up_at", 0.0)
    resumed = []
    for gen_id in redis_fault.pop("running", []):
        after = [parse_id(e.id)[0] / 1000 for e in streams[gen_id]]
        later = [t for t in after if t >= up_at]
        if later:
            resumed.append(later[0] - up_at)
    redis_fault.update(streams=len(resumed), p50_s=p50(resumed),
                       max_s=max(resumed, default=0.0))
    report.faults["redis_restart"] = redis_fault
