"""The ``openai:`` provider: any OpenAI-compatible Chat Completions endpoint, via the official SDK.

How a stream ends: with a Finish only when the upstream named a finish reason. A
stream that stops without one (an empty 200, ``[DONE]`` alone, a connection that
breaks mid-answer) raises ``UpstreamIncomplete``: a cut-off answer is never complete.

Errors (``upstream_status`` in the event keeps the HTTP status):

    400 401 403 404 422, other 4xx        upstream_error, not retryable (fails the same again)
    408 409 429 5xx, timeout, unreachable upstream_error, retryable
    no finish reason, no output           upstream_incomplete, not retryable (e.g. over context)
    no finish reason after some output    upstream_incomplete, retryable (e.g. the upstream died)

Retries: the SDK retries (``MAX_RETRIES``) only before the response's headers arrive,
and only connection errors, timeouts, 408, 409, 429 and 5xx, waiting what Retry-After
says (up to the SDK's cap) or backing off: before the first token, so a retry cannot
duplicate text, and a refused request (401, ...) is sent exactly once.

Reading: the SDK makes the request and hands back the response unread; the body is read
here, in the sizes the network delivers, and split into events by ``EventData``. An error
object inside a 200 stream (``{"error": ...}``) is an upstream_error, as a chunk that is
not JSON is; after ``[DONE]`` the rest of the body is read for at most ``DRAIN_S``, so that
HTTP/1.1 can reuse the connection. Cancelling the consuming task closes the response, and
with it the HTTP connection, so the upstream stops generating (and billing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import openai
from openai import AsyncOpenAI

from tokenrelay.shared.errors import UpstreamError, UpstreamIncomplete
from tokenrelay.worker.providers.base import (
    Chunk,
    Delta,
    Finish,
    GenerationRequest,
    ToolCallFragments,
    estimate_usage,
)
from tokenrelay.worker.providers.event_stream import EventData

try:  # the SDK's HTTP client from openai 3 on: its response is read here
    import httpx2 as _http
except ImportError:  # pragma: no cover - openai 1.x and 2.x read with httpx
    import httpx as _http  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

MAX_RETRIES = 2  # the SDK's own default, said out loud: see the module docstring
CONNECT_TIMEOUT_S = 10.0
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
DRAIN_S = 0.1  # after [DONE], how long the body's end may take to come (the SDK waits as long)
# What reading a response's body raises when the connection fails: the SDK's own list
# (ssl and anyio errors a TLS stream can let through unmapped, pydantic/httpx2#854).
READ_ERRORS = (_http.RequestError, ssl.SSLError, anyio.EndOfStream)


class OpenAICompatProvider:
    def __init__(self, base_url: str | None, api_key: str | None, timeout_s: float = 600.0):
        self._client = AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "unset",
            max_retries=MAX_RETRIES,
            timeout=openai.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
        )
        self.base_url = public_url(str(self._client.base_url))

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        params: dict[str, Any] = dict(request.extra)
        if request.max_tokens is not None:
            params["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            params["temperature"] = request.temperature
        try:
            # The SDK makes the request (retries, errors by status) and hands the response
            # back unread; its body is read here, each network read split into events at
            # once: the SDK's own stream took each chunk through five more generators and an
            # object per line: about a fifth of the worker's CPU per token
            # (docs/benchmarks.md, write path).
            response: _http.Response = await self._client.post(
                "/chat/completions",
                body={"model": request.model, "messages": request.messages, "stream": True,
                      "stream_options": {"include_usage": True}, **params},
                cast_to=_http.Response,
                stream=True,
            )
        except openai.APIError as exc:
            raise self._failure(exc) from exc

        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        produced = 0  # characters of output so far
        fragments = ToolCallFragments()
        events = EventData()
        done = False  # [DONE] seen
        try:
            async with contextlib.aclosing(_body(response)) as body:
                async for raw in body:
                    for data in events.feed(raw):
                        if done := data.startswith(b"[DONE]"):
                            break
                        chunk = self._chunk(data)
                        if not isinstance(chunk, dict):
                            continue
                        if isinstance(chunk.get("usage"), dict):
                            usage = {key: chunk["usage"][key] for key in USAGE_KEYS
                                     if key in chunk["usage"]}
                        for choice in chunk.get("choices") or ():
                            if choice.get("finish_reason"):
                                finish_reason = choice["finish_reason"]
                            delta = _delta(choice.get("delta"), fragments)
                            if delta is not None:
                                produced += delta.size()
                                yield delta
                    if done:
                        await _drain(body)
                        break
        except READ_ERRORS as exc:  # the connection broke or went silent mid-stream
            raise self._cut_off(produced, f"{type(exc).__name__}: {exc}") from exc
        finally:
            # Also when the consuming task is cancelled: closing an unfinished response
            # closes its connection, and the upstream stops generating.
            await response.aclose()
        if finish_reason is None:
            raise self._cut_off(produced, "the stream ended without a finish reason")
        yield Finish(finish_reason, usage or estimate_usage(request.messages, produced))

    def _chunk(self, data: bytes) -> Any:
        """One event's data as the JSON it holds; the error object an upstream sends
        inside a 200 stream raises, as the SDK's stream did."""
        try:
            # Bytes that are not UTF-8 become U+FFFD, as lone surrogates do (``utf8_safe``).
            chunk = json.loads(data.decode("utf-8", "replace"))
        except ValueError as exc:
            raise UpstreamError("the upstream sent a chunk that is not JSON",
                                detail=f"{self.base_url}: {data[:200]!r}") from exc
        if isinstance(chunk, dict) and chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise UpstreamError("the upstream reported an error mid-stream",
                                detail=f"{self.base_url}: {message or json.dumps(error)}")
        return chunk

    def _failure(self, exc: openai.APIError) -> UpstreamError:
        """The error a failed request becomes: a generic message, the upstream's words logged."""
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            data: dict[str, Any] = {}
            retry_after = exc.response.headers.get("retry-after")
            if retry_after and retry_after.isdigit():
                data["retry_after_s"] = int(retry_after)
            return UpstreamError.for_status(
                status, f"{self.base_url}: HTTP {status}: {_body_text(exc)}", **data)
        if isinstance(exc, openai.APITimeoutError):
            return UpstreamError(f"the upstream at {self.base_url} did not answer in time",
                                 detail=str(exc))
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            return UpstreamError(f"could not reach the upstream at {self.base_url}",
                                 detail=f"{exc}: {cause!r}" if cause else str(exc))
        return UpstreamError("the upstream request failed", detail=f"{self.base_url}: {exc}")

    def _cut_off(self, produced: int, why: str) -> UpstreamIncomplete:
        detail = f"{self.base_url}: {why}"
        if produced:
            return UpstreamIncomplete("the upstream's answer stopped before it finished",
                                      retryable=True, detail=detail)
        # A 200 with nothing in it: what llama.cpp's server answers to a prompt longer than
        # its context, among others. The same request would end the same way.
        return UpstreamIncomplete(
            "the upstream ended its stream with no output and no finish reason "
            "(the prompt may not fit its context)",
            retryable=False, detail=detail,
        )


def _body(response: _http.Response) -> AsyncGenerator[bytes, None]:
    """The response's body as it arrives, decompressed only when the upstream (or a proxy on
    the way) compressed it: ``aiter_bytes`` costs one more generator and decoder per read."""
    if response.headers.get("content-encoding", "identity") == "identity":
        return response.aiter_raw()
    return response.aiter_bytes()


async def _drain(body: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` (the body's end, normally in the same read) for at most
    ``DRAIN_S``: HTTP/1.1 reuses a connection only once its body has been read to the end,
    and the answer is complete whatever comes, or fails to come, after it."""
    with contextlib.suppress(TimeoutError, *READ_ERRORS):
        async with asyncio.timeout(DRAIN_S):
            async for _ in body:
                pass


def _body_text(exc: openai.APIStatusError) -> str:
    """The upstream's error body as it sent it (the SDK has read it before raising)."""
    try:
        return exc.response.text
    except _http.ResponseNotRead:  # pragma: no cover - read by the SDK in practice
        return repr(exc.body)


def public_url(url: str) -> str:
    """``url`` without credentials or query: fit for a client's error message."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _delta(raw: Any, fragments: ToolCallFragments) -> Delta | None:
    """A chunk's ``delta`` object as a ``Delta`` (None when it carries no output)."""
    if not isinstance(raw, dict):
        return None
    content = raw.get("content")
    reasoning = raw.get("reasoning_content") or raw.get("reasoning")
    calls = raw.get("tool_calls")
    tool_calls = fragments.once([_without_none(call) for call in calls]) if calls else None
    if not (content or reasoning or tool_calls):
        return None
    return Delta(content=content or None, reasoning=reasoning, tool_calls=tool_calls)


def _without_none(value: Any) -> Any:
    """``value`` with every null field left out, nested ones too (as the SDK's
    ``model_dump(exclude_none=True)`` gave them)."""
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value
