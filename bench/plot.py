"""Draws docs/benchmarks.png from the figures the benchmarks kept in bench/results/*.json.

    python bench/plot.py        # needs the bench extra: pip install -e '.[bench]'

Panels whose results are missing are left out; nothing here measures anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = ROOT / "docs" / "benchmarks.png"
COLORS = {"tokenrelay": "#1f77b4", "naive": "#d62728"}


def noise(run: dict[str, Any]) -> float:
    """The most CPU the rest of the machine used during any part of a run (0 if unknown)."""
    found = [0.0]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "others" in node and isinstance(node["others"], int | float):
                found.append(float(node["others"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(run)
    return max(found)


def history(name: str) -> list[dict[str, Any]]:
    """Every recorded run of a scenario (bench/results/history.jsonl), oldest first."""
    path = RESULTS / "history.jsonl"
    if not path.exists():
        return []
    runs = (json.loads(line) for line in path.read_text().splitlines())
    return [run for run in runs if run.get("scenario") == name]


def load(name: str, full: int = 0) -> dict[str, Any] | None:
    """The quietest recorded run of a scenario (bench/results/history.jsonl), else its latest.
    ``full``: only runs with at least that many viewer counts (a run of one N is a probe)."""
    runs = history(name)
    if full:
        runs = [r for r in runs if len({x.get("n") for x in r.get("runs", [])}) >= full]
    if runs:
        best = min(reversed(runs), key=noise)  # the latest of equally quiet runs
        print(f"{name}: run of {best['recorded_at']} (others up to {noise(best) * 100:.0f}% "
              f"of a core; {len(runs)} runs recorded)")
        return best
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fanout_panel(ax: Axes, a: dict[str, Any] | None, f: dict[str, Any] | None) -> None:
    f_runs = (f or {}).get("a", {}).get("runs", [])
    ours = [r for r in (a or {}).get("runs", []) if r["server"] == "tokenrelay"]
    ours = ours or [r for r in f_runs if r["server"] == "tokenrelay"]
    naive = [r for r in f_runs if r["server"] == "naive"]
    for server, rows in (("tokenrelay", ours), ("naive", naive)):
        first: dict[int, dict[str, Any]] = {}
        for r in rows:
            if r.get("stalled") or r.get("extra", {}).get("stall_pair"):
                continue  # the stall comparison, not the fan-out curve
            first.setdefault(r["n"], r)
        mine = [first[n] for n in sorted(first)]
        if not mine:
            continue
        ns = [r["n"] for r in mine]
        ax.plot(ns, [r["latency"]["p50"] for r in mine], "o--", color=COLORS[server],
                label=f"{server} p50")
        ax.plot(ns, [r["latency"]["p99"] for r in mine], "o-", color=COLORS[server],
                label=f"{server} p99")
    ax.plot([1000, 3000], [25, 250], "k*", markersize=10, label="target p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("viewers of one generation (50 events/s)")
    ax.set_ylabel("delivery latency, ms")
    ax.set_title("a/f. fan-out latency")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


def queue_hop_panel(ax: Axes, hop: dict[str, Any]) -> None:
    samples = sorted(hop["samples_ms"])
    ys = [(i + 1) / len(samples) for i in range(len(samples))]
    ax.plot(samples, ys, color=COLORS["tokenrelay"])
    ax.axvline(5, color="k", ls="--", lw=0.8, label="target p50 5 ms")
    ax.axvline(20, color="k", ls=":", lw=0.8, label="target p99 20 ms")
    ax.axvline(3, color="g", ls="--", lw=0.8, label="issue 15: p50 3 ms")
    ax.axvline(10, color="g", ls=":", lw=0.8, label="issue 15: p99 10 ms")
    ax.set_xlabel("POST sent -> first delta, ms")
    ax.set_ylabel("fraction of generations")
    ax.set_title(f"queue hop ({hop['count']} generations)")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def commands_panel(ax: Axes, b: dict[str, Any]) -> None:
    runs = b["runs"]
    servers = [s for s in ("tokenrelay", "naive") if any(r["server"] == s for r in runs)]
    ns = sorted({r["n"] for r in runs})
    width = 0.8 / max(1, len(servers))
    for k, server in enumerate(servers):
        totals = [sum(next(r for r in runs if r["server"] == server and r["n"] == n)
                      ["commands"].values()) for n in ns]
        xs = [i + k * width for i in range(len(ns))]
        ax.bar(xs, totals, width, color=COLORS[server], label=server)
        for x, total in zip(xs, totals, strict=True):
            ax.text(x, total, str(total), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width * (len(servers) - 1) / 2 for i in range(len(ns))],
                  [f"N = {n}" for n in ns])
    ax.set_ylabel("Redis commands for one generation")
    ax.set_title(f"b. Redis work vs viewers ({b['tokens']} tokens)")
    ax.legend(fontsize=7)


def memory_panel(ax: Axes, d: dict[str, Any]) -> None:
    runs = d["runs"]
    names = [r["server"] for r in runs]
    values = [r["kib_per_viewer"] for r in runs]
    ax.bar(names, values, color=[COLORS.get(n, "gray") for n in names])
    for i, value in enumerate(values):
        ax.text(i, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(16, color="k", ls="--", lw=0.8, label="target 16 KiB")
    ax.axhline(12, color="g", ls="--", lw=0.8, label="issue 15: 12 KiB")
    ax.set_ylabel("KiB of RSS per idle viewer")
    ax.set_title(f"d. memory per idle viewer (N = {runs[0]['n']})")
    ax.legend(fontsize=7)


def latency_bars_panel(ax: Axes, c: dict[str, Any] | None, e: dict[str, Any] | None) -> None:
    labels, p50, p99 = [], [], []
    if c:
        labels.append(f"c. {c['streams']} streams\nevent delivery")
        p50.append(c["latency"]["p50"])
        p99.append(c["latency"]["p99"])
    if e:
        labels.append("e. resume\nreconnect -> first event")
        p50.append(e["latency"]["p50"])
        p99.append(e["latency"]["p99"])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50", color="#9ecae1")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99", color=COLORS["tokenrelay"])
    for x, (lo, hi) in enumerate(zip(p50, p99, strict=True)):
        ax.text(x - 0.2, lo, f"{lo:.1f}", ha="center", va="bottom", fontsize=7)
        ax.text(x + 0.2, hi, f"{hi:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("c, e. many streams and resume")
    ax.legend(fontsize=7)


def chat_api_panel(ax: Axes, runs: list[dict[str, Any]]) -> None:
    """Issue 15: the API's CPU per delivered event in the chat case, run by run."""
    xs = [r["events"] / r["api_writes"] for r in runs if r.get("api_writes")]
    ys = [r["api_us_per_event"] for r in runs if r.get("api_writes")]
    ax.plot(xs, ys, "o", color=COLORS["tokenrelay"], label="runs (write calls counted)")
    ax.axhline(15, color="g", ls="--", lw=0.8, label="issue 15: 15 us")
    ax.set_xlabel("events per write call of the API")
    ax.set_ylabel("API CPU per delivered event, us")
    ax.set_title(f"chat case: 1,000 x 30 tokens/s ({len(ys)} runs)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def nchan_panel(ax: Axes, runs: list[dict[str, Any]]) -> None:
    """Issue 15: tokenrelay / nchan per round (p99 and server CPU), every recorded run."""
    rounds = [r for run in runs for r in run.get("rounds", [])]
    xs = range(1, len(rounds) + 1)
    ax.plot(xs, [r["p99_ratio"] for r in rounds], "o", color=COLORS["tokenrelay"],
            label="p99 ratio")
    ax.plot(xs, [r["cpu_ratio"] for r in rounds], "s", color="#ff7f0e", label="server CPU ratio")
    ax.axhline(1.0, color=COLORS["tokenrelay"], ls="--", lw=0.8, label="target p99 1 x")
    ax.axhline(1.5, color="#ff7f0e", ls="--", lw=0.8, label="target CPU 1.5 x")
    ax.set_xlabel("round (alternating, N = 1,000, 50 events/s)")
    ax.set_ylabel("tokenrelay / nginx+nchan")
    ax.set_title("fan-out beside nchan")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def main() -> int:
    hop, b, c, d, e, f = (load(n) for n in ("queue_hop", "b", "c", "d", "e", "f"))
    a = load("a", full=3)
    chat = [r for r in history("c") if r.get("api_us_per_event")]
    nchan = history("nchan")
    panels = []
    if a or f:
        panels.append(lambda ax: fanout_panel(ax, a, f))
    if hop:
        panels.append(lambda ax: queue_hop_panel(ax, hop))
    b_source = (f or {}).get("b") or b
    if b_source:
        panels.append(lambda ax: commands_panel(ax, b_source))
    d_source = (f or {}).get("d") or d
    if d_source:
        panels.append(lambda ax: memory_panel(ax, d_source))
    if c or e:
        panels.append(lambda ax: latency_bars_panel(ax, c, e))
    if chat:
        panels.append(lambda ax: chat_api_panel(ax, chat))
    if nchan:
        panels.append(lambda ax: nchan_panel(ax, nchan))
    if not panels:
        print("no results in bench/results/: run the benchmarks first", file=sys.stderr)
        return 1
    cols = 3 if len(panels) > 4 else 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for draw, ax in zip(panels, flat, strict=False):
        draw(ax)
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.suptitle("tokenrelay on a shared 2-core machine (client, API, worker, Redis together)")
    fig.tight_layout()
    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
