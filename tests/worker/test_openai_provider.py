"""The openai: provider against a local OpenAI-compatible server: how streams end, how errors map.

tests/fake_upstream.py plays the upstream (refusals by status, cut-off and empty streams);
tests/test_real_model.py shows the same against llama.cpp's server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.fake_upstream import Record, fake_upstream
from tokenrelay.cli.redis_server import free_port
from tokenrelay.shared.errors import ProviderError, UpstreamError, UpstreamIncomplete
from tokenrelay.worker.providers import Delta, Finish, GenerationRequest
from tokenrelay.worker.providers.base import estimate_usage
from tokenrelay.worker.providers.openai_compat import OpenAICompatProvider

USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Record]]:
    with fake_upstream() as found:
        yield found


async def _run(base_url: str, model: str) -> tuple[list[Delta | Finish], ProviderError | None]:
    provider = OpenAICompatProvider(base_url, "test-key")
    out: list[Delta | Finish] = []
    try:
        async for chunk in provider.stream(GenerationRequest(model=model, messages=USER)):
            out.append(chunk)
    except ProviderError as exc:
        return out, exc
    finally:
        await provider.aclose()
    return out, None


@pytest.mark.parametrize(("status", "retryable", "calls"), [
    (400, False, 1), (401, False, 1), (403, False, 1), (404, False, 1), (422, False, 1),
    (408, True, 3), (409, True, 3), (429, True, 3), (500, True, 3), (503, True, 3),
])
async def test_upstream_status_maps_to_retryable_or_not(
    upstream: tuple[str, Record], status: int, retryable: bool, calls: int
) -> None:
    """A refusal (400/401/403/404/422) is sent once and is not retryable; 408/409/429/5xx are
    retried by the SDK before any token and stay retryable; the event keeps the HTTP status."""
    url, record = upstream
    before = len(record.requests)
    chunks, error = await _run(url, f"status-{status}")
    assert chunks == [] and isinstance(error, UpstreamError)
    assert len(record.requests) - before == calls
    event = error.as_event()
    assert event["code"] == "upstream_error"
    assert event["retryable"] is retryable
    assert event["upstream_status"] == status


async def test_client_message_is_generic_and_the_log_gets_the_upstream_text(
    upstream: tuple[str, Record], caplog: pytest.LogCaptureFixture
) -> None:
    """The client's message names the class and status only; the upstream's words go to the
    log line, newlines escaped."""
    url, _ = upstream
    _, error = await _run(url, "status-400")
    assert error is not None
    assert error.message == "the upstream rejected the request (HTTP 400)"
    assert "secret detail" not in str(error.as_event())
    log_line = str(error)
    assert "upstream says no\\nsecret detail" in log_line and "\n" not in log_line


async def test_unreachable_upstream_names_its_base_url() -> None:
    """A connection refused says which upstream could not be reached, without its credentials."""
    base = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    _, error = await _run(base.replace("http://", "http://user:pw@"), "any")
    assert isinstance(error, UpstreamError) and error.retryable
    assert error.message == f"could not reach the upstream at {base}"
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(("model", "retryable"), [("cutoff", True), ("empty", False)])
async def test_a_stream_without_finish_reason_is_incomplete(
    upstream: tuple[str, Record], model: str, retryable: bool
) -> None:
    """A stream that ends without a finish reason raises upstream_incomplete, never a Finish:
    retryable after some output (the upstream died), not when nothing came (e.g. context)."""
    url, _ = upstream
    chunks, error = await _run(url, model)
    assert not any(isinstance(c, Finish) for c in chunks)
    assert isinstance(error, UpstreamIncomplete)
    assert error.as_event()["code"] == "upstream_incomplete"
    assert error.retryable is retryable
    expected_text = "cut off" if model == "cutoff" else ""
    assert "".join(c.content or "" for c in chunks if isinstance(c, Delta)) == expected_text


async def test_upstream_usage_is_kept_when_sent(upstream: tuple[str, Record]) -> None:
    """An upstream that reports usage is believed (no estimate, no `estimated` mark)."""
    url, _ = upstream
    chunks, error = await _run(url, "hello")
    assert error is None and isinstance(chunks[-1], Finish)
    assert chunks[-1].usage == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


def test_usage_estimate_is_characters_over_four() -> None:
    """Without upstream usage: ceil(characters / 4) for prompt and completion, marked estimated."""
    messages = [{"role": "system", "content": "abcd"},
                {"role": "user", "content": [{"type": "text", "text": "x"}]}]
    parts_chars = len('[{"type": "text", "text": "x"}]')
    usage = estimate_usage(messages, completion_chars=9)
    prompt = -(-(4 + parts_chars) // 4)
    assert usage == {"prompt_tokens": prompt, "completion_tokens": 3,
                     "total_tokens": prompt + 3, "estimated": True}


def test_provider_error_log_text_is_one_line() -> None:
    """str() of a provider error is its message and detail on one line, for the worker's log."""
    error = UpstreamError("short", detail="line one\r\nline two\ttab")
    assert str(error) == "short: line one\\r\\nline two\\ttab"
