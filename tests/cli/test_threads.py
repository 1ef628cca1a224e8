"""cli/threads.py's rendering: how `tokenrelay threads` says when and how much."""

from __future__ import annotations

import io
from datetime import datetime

from tokenrelay.cli.threads import ago, show_threads

NOW = 1_800_000_000.0


def test_ago_says_it_as_people_do() -> None:
    assert ago(NOW - 5, NOW) == "just now"
    assert ago(NOW - 125, NOW) == "2 min ago"
    assert ago(NOW - 3 * 3600 - 10, NOW) == "3 h ago"
    assert ago(NOW - 3 * 86400, NOW) == datetime.fromtimestamp(NOW - 3 * 86400).strftime(
        "%Y-%m-%d %H:%M")


def test_the_table_has_one_row_per_thread_and_marks_an_answer_in_progress() -> None:
    out = io.StringIO()
    show_threads([
        {"id": "thr_a", "title": "[bold]not markup[/bold]", "updated_at": NOW - 10,
         "message_count": 4, "active_generation_id": None},
        {"id": "thr_b", "title": "", "updated_at": NOW - 600, "message_count": 1,
         "active_generation_id": "gen_x"},
    ], out, NOW)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["thread", "title", "last", "activity", "messages"]
    assert lines[1].split()[0] == "thr_a" and "[bold]not markup[/bold]" in lines[1]
    assert "just now" in lines[1] and lines[1].split()[-1] == "4"
    assert lines[2].split()[0] == "thr_b" and "(empty)" in lines[2]
    assert "10 min ago" in lines[2] and lines[2].rstrip().endswith("1 (answering)")


def test_no_threads_says_how_to_start_one() -> None:
    out = io.StringIO()
    show_threads([], out, NOW)
    assert "tokenrelay chat" in out.getvalue()
