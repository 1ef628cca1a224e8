"""The chaos run (bench/chaos.py), bounded for CI: faults in every process, nothing lost."""

from __future__ import annotations

import pytest

from bench.chaos import Chaos, Config

pytestmark = pytest.mark.slow  # starts real processes


def test_chaos_run_loses_and_duplicates_nothing() -> None:
    """kill -9 of an API process and a worker and a Redis restart mid-run: every generation
    completes, every viewer's text equals the status content, no event lost or duplicated."""
    config = Config(generations=12, viewers=10, tokens=40, tps=10.0, create_over_s=8.0,
                    deadline_s=180.0)
    report = Chaos(config).run()
    print("\n" + "\n".join(report.lines()))
    assert report.terminal == {"done": 12}
    assert report.viewers == report.viewers_text_equal == 120
    assert report.incomplete_viewers == 0
    assert (report.lost, report.duplicated, report.reordered_viewers) == (0, 0, 0)
    # Each fault happened, and hit work in flight.
    assert report.faults["api_kill"]["viewers"] >= 1
    assert report.faults["worker_kill"]["restarted"] >= 1
    assert report.faults["redis_restart"]["streams"] >= 1
    assert report.drops > 0
