"""Metrics, request ids and JSON logs, from real processes."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.client import collect, create
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.slow  # starts real processes


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match[1])


def test_metrics_cover_generations_errors_and_viewers() -> None:
    """/metrics reports finished generations by status, TTFT, queue wait, tokens/s and error codes."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_LOG_FORMAT": "json",
                                      "TOKENRELAY_LOG_LEVEL": "INFO"})
    try:
        ok = create(s.url, model="fake:lorem", prompt="x", max_tokens=10)
        bad = create(s.url, model="fake:error", prompt="x")
        collect(s.url, ok["id"]), collect(s.url, bad["id"])
        httpx.get(f"{s.url}/v1/generations/gen_{'0' * 32}")  # a 404

        def scraped() -> str | None:
            # The statistics are written just after each terminal event: poll for both.
            text = httpx.get(f"{s.url}/metrics").text
            return text if 'status="failed"' in text and 'status="completed"' in text else None

        text = wait_for(scraped, 10, what="finished generations in /metrics")
        assert _metric(text, "tokenrelay_generations_finished_total", 'status="completed"') >= 1
        assert _metric(text, "tokenrelay_generations_finished_total", 'status="failed"') >= 1
        assert _metric(text, "tokenrelay_generation_errors_total", 'code="upstream_error"') >= 1
        assert _metric(text, "tokenrelay_time_to_first_token_seconds_count") >= 2
        assert _metric(text, "tokenrelay_queue_wait_seconds_count") >= 2
        assert _metric(text, "tokenrelay_tokens_per_second_count") >= 1
        assert _metric(text, "tokenrelay_http_errors_total", 'code="not_found"') >= 1
        assert _metric(text, "tokenrelay_queue_depth") == 0
        assert "tokenrelay_viewers" in text and "tokenrelay_active_streams" in text
        assert _metric(text, "tokenrelay_hub_lag_seconds_count") >= 1  # live events were read

        response = httpx.get(f"{s.url}/healthz", headers={"X-Request-Id": "trace-me-123"})
        assert response.headers["x-request-id"] == "trace-me-123"
        assert re.fullmatch(r"[0-9a-f]{16}", httpx.get(f"{s.url}/healthz").headers["x-request-id"])

        created_lines = [json.loads(line) for line in s.apis[0].output().splitlines()
                         if line.startswith("{") and ok["id"] in line]
        assert created_lines, "the API logs its generations as JSON lines"
        assert all(line["request_id"] != "-" for line in created_lines)
    finally:
        s.stop()
