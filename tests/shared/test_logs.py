"""Log lines: one per event, whatever text a client or an upstream puts in a message."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from tokenrelay.shared import logs

FORGED = "openai:x\n2026-12-05 03:00:00,000 ERROR tokenrelay [-] forged\r\x1b[2Kline"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_message_with_newlines_stays_one_line(captured: io.StringIO, fmt: str) -> None:
    logs.configure("INFO", fmt)
    logging.getLogger().handlers[0].setStream(captured)  # type: ignore[attr-defined]
    logging.getLogger("tokenrelay.test").warning("created model=%s", FORGED)
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1
    if fmt == "json":
        assert json.loads(lines[0])["message"] == f"created model={FORGED}"
    else:
        assert "\\n2026-12-05" in lines[0] and "\\x1b" in lines[0] and "\x1b" not in lines[0]


def test_a_traceback_keeps_its_lines(captured: io.StringIO) -> None:
    logs.configure("INFO", "text")
    logging.getLogger().handlers[0].setStream(captured)  # type: ignore[attr-defined]
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("tokenrelay.test").exception("failed for %s", "a\nb")
    first, *rest = captured.getvalue().splitlines()
    assert first.endswith("failed for a\\nb")
    assert rest[0] == "Traceback (most recent call last):"
