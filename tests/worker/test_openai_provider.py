"""The openai: provider against a local OpenAI-compatible server: how streams end, how errors map.

tests/fake_upstream.py plays the upstream (refusals by status, cut-off and empty streams);
tests/test_real_model.py shows the same against llama.cpp's server.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fake_upstream import Record, fake_upstream
from tests.stack import wait_for
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


class WireUpstream:
    """An upstream that answers every request with the same bytes, written as they are given:
    the HTTP framing (chunked, gzip, a connection dropped or held open) is the test's to choose.
    Counts the connections it accepts, to show when the client reused one.

    After the pieces, ``then`` is ``keep`` (wait for the next request on the connection),
    ``close`` (close it) or ``hold`` (keep it open, silent, until the test ends)."""

    def __init__(self, head: bytes, pieces: list[bytes], *, then: str = "keep"):
        self.head = head
        self.pieces = pieces
        self.then = then
        self.connections = 0
        self.requests = 0
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.requests += 1
                writer.write(self.head)
                for piece in self.pieces:
                    writer.write(piece)
                    await writer.drain()
                if self.then == "hold":
                    await self.release.wait()
                if self.then != "keep":
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def chunked(*frames: bytes) -> list[bytes]:
    """``frames`` as HTTP/1.1 chunks, each its own write, then the last chunk."""
    return [b"%x\r\n%s\r\n" % (len(frame), frame) for frame in frames] + [b"0\r\n\r\n"]


def sse_head(*headers: bytes) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 200 OK", b"content-type: text/event-stream",
                         *headers, b"", b""])


CHUNKED = sse_head(b"transfer-encoding: chunked")


def chunk_of(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


HELLO = [chunk_of({"content": "hel"}), chunk_of({"content": "lo"}), chunk_of({}, "stop"),
         b"data: [DONE]\n\n"]


def text(chunks: list[Delta | Finish]) -> str:
    return "".join(c.content or "" for c in chunks if isinstance(c, Delta))


async def test_events_split_across_http_chunks_with_crlf_and_comments() -> None:
    """Events cut anywhere across HTTP chunks, CRLF line ends, comments and `event:`/`id:`
    lines read as the deltas and the finish the upstream sent."""
    stream = b": keep-alive\r\n\r\n" + b"".join(HELLO).replace(b"\n", b"\r\n").replace(
        b"data: {", b"event: chunk\r\nid: 1\r\ndata: {")
    pieces = [stream[at:at + 5] for at in range(0, len(stream), 5)]
    async with WireUpstream(CHUNKED, chunked(*pieces)) as url:
        chunks, error = await _run(url, "m")
    assert error is None and text(chunks) == "hello"
    assert isinstance(chunks[-1], Finish) and chunks[-1].finish_reason == "stop"


async def test_a_gzipped_stream_is_decompressed() -> None:
    """A stream a proxy compressed (`content-encoding: gzip`) reads as the same deltas."""
    body = gzip.compress(b"".join(HELLO))
    async with WireUpstream(sse_head(b"content-encoding: gzip", b"transfer-encoding: chunked"),
                            chunked(body[:10], body[10:])) as url:
        chunks, error = await _run(url, "m")
    assert error is None and text(chunks) == "hello" and isinstance(chunks[-1], Finish)


async def test_an_error_object_mid_stream_is_an_upstream_error() -> None:
    """`{"error": ...}` inside a 200 stream (what OpenAI-compatible servers send when they
    fail mid-answer, with or without `event: error`) ends the stream with upstream_error,
    after the deltas before it; the upstream's message goes to the log line only."""
    error_event = b'event: error\ndata: {"error": {"message": "server overloaded"}}\n\n'
    async with WireUpstream(CHUNKED, chunked(HELLO[0], error_event, *HELLO[1:])) as url:
        chunks, error = await _run(url, "m")
    assert text(chunks) == "hel" and not any(isinstance(c, Finish) for c in chunks)
    assert isinstance(error, UpstreamError) and not isinstance(error, UpstreamIncomplete)
    assert error.message == "the upstream reported an error mid-stream"
    assert error.retryable and "server overloaded" in str(error)


async def test_a_chunk_that_is_not_json_is_an_upstream_error() -> None:
    """An event whose data is not JSON ends the stream with upstream_error, not a crash."""
    async with WireUpstream(CHUNKED, chunked(HELLO[0], b"data: {oops\n\n", *HELLO[1:])) as url:
        chunks, error = await _run(url, "m")
    assert text(chunks) == "hel"
    assert isinstance(error, UpstreamError)
    assert error.message == "the upstream sent a chunk that is not JSON"


async def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    """Bytes that are not UTF-8 inside a chunk's text become U+FFFD; the stream goes on."""
    bad = chunk_of({"content": "ab"}).replace(b"ab", b"a\xff\xfeb")
    async with WireUpstream(CHUNKED, chunked(bad, *HELLO[2:])) as url:
        chunks, error = await _run(url, "m")
    assert error is None and text(chunks) == "a\ufffd\ufffdb"


async def test_a_connection_dropped_mid_stream_is_incomplete_and_retryable() -> None:
    """A connection that closes in the middle of the body (no last chunk) is
    upstream_incomplete, retryable since output came."""
    async with WireUpstream(CHUNKED, chunked(*HELLO[:2])[:-1], then="close") as url:
        chunks, error = await _run(url, "m")
    assert text(chunks) == "hello"
    assert isinstance(error, UpstreamIncomplete) and error.retryable
    assert "RemoteProtocolError" in str(error)


async def test_done_ends_the_answer_even_when_the_body_does_not_end() -> None:
    """After [DONE] the answer finishes within a moment even if the upstream keeps the
    response open (the rest of the body is waited for DRAIN_S at most)."""
    async with WireUpstream(CHUNKED, chunked(*HELLO)[:-1], then="hold") as url:
        started = time.monotonic()
        chunks, error = await _run(url, "m")
        elapsed = time.monotonic() - started
    assert error is None and isinstance(chunks[-1], Finish) and text(chunks) == "hello"
    assert elapsed < 5


async def test_consecutive_streams_reuse_one_connection() -> None:
    """A stream read to [DONE] leaves its HTTP/1.1 connection reusable: three answers in a
    row cost the upstream one connection."""
    upstream = WireUpstream(CHUNKED, chunked(*HELLO))
    async with upstream as url:
        provider = OpenAICompatProvider(url, "test-key")
        try:
            for _ in range(3):
                out = [c async for c in provider.stream(GenerationRequest("m", USER))]
                assert text(out) == "hello"
        finally:
            await provider.aclose()
    assert upstream.requests == 3 and upstream.connections == 1


async def test_cancelling_the_consumer_closes_the_upstream_connection(
    upstream: tuple[str, Record]
) -> None:
    """Cancelling the task that reads a stream closes its connection at once: the upstream
    sees the client gone (and stops generating)."""
    url, record = upstream
    provider = OpenAICompatProvider(url, "test-key")
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(GenerationRequest("slow", USER)):
            first.set()

    before = record.disconnected
    task = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_at = time.monotonic()
        # The upstream runs in its own thread: waiting here blocks nothing it needs.
        wait_for(lambda: record.disconnected > before, 5, 0.01, "the upstream to see the close")
        assert record.disconnected_at[-1] - cancelled_at < 1
    finally:
        await provider.aclose()
