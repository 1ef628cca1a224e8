"""Fixtures: real processes against a private redis-server (never the machine's own Redis)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_upstream import Record, fake_upstream
from tests.stack import Stack
from tokenrelay.cli.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, removed after the test."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """One API process and one worker (fake provider, no TTFT) shared by a test module."""
    s = Stack(apis=1, workers=1)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stack2() -> Iterator[Stack]:
    """Two API processes and two workers on one Redis."""
    s = Stack(apis=2, workers=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Record]]:
    """A local OpenAI-compatible server (tests/fake_upstream.py): its base URL and record."""
    with fake_upstream() as found:
        yield found


@pytest.fixture(scope="module")
def upstream_stack(upstream: tuple[str, Record]) -> Iterator[Stack]:
    """One API process and one worker whose openai: provider talks to ``upstream``."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_OPENAI_BASE_URL": upstream[0],
                                      "TOKENRELAY_OPENAI_API_KEY": "test"})
    yield s
    s.stop()
