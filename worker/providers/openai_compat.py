"""The ``openai:`` provider: any OpenAI-compatible Chat Completions endpoint, via the official SDK.

Cancelling the consuming task closes the SDK's stream, and with it the HTTP
connection, so the upstream stops generating (and billing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
from openai import AsyncOpenAI

from tokenrelay.shared.errors import UpstreamError
from tokenrelay.worker.providers.base import Chunk, Delta, Finish, GenerationRequest


class OpenAICompatProvider:
    def __init__(self, base_url: str | None, api_key: str | None, timeout_s: float = 600.0):
        self._client = AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "unset",
            max_retries=0,  # a retry after partial output would duplicate text
            timeout=timeout_s,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        params: dict[str, Any] = dict(request.extra)
        if request.max_tokens is not None:
            params["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            params["temperature"] = request.temperature
        finish_reason: str | None = None
        usage: dict[str, int] | None = None
        try:
            stream = await self._client.chat.completions.create(  # type: ignore[call-overload]
                model=request.model,
                messages=request.messages,
                stream=True,
                stream_options={"include_usage": True},
                **params,
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage.model_dump(
                            include={"prompt_tokens", "completion_tokens", "total_tokens"}
                        )
                    for choice in chunk.choices:
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
                        delta = _delta(choice.delta)
                        if delta is not None:
                            yield delta
        except openai.APIError as exc:
            raise UpstreamError(f"upstream failed: {exc}") from exc
        yield Finish(finish_reason or "stop", usage)


def _delta(raw: Any) -> Delta | None:
    if raw is None:
        return None
    extra = raw.model_extra or {}
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
    tool_calls = (
        [tc.model_dump(exclude_none=True) for tc in raw.tool_calls] if raw.tool_calls else None
    )
    if not (raw.content or reasoning or tool_calls):
        return None
    return Delta(content=raw.content or None, reasoning=reasoning, tool_calls=tool_calls)
