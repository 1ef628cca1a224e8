"""The ``anthropic:`` provider: Anthropic's Messages API, via the official SDK.

OpenAI-shaped messages and tools go in; Anthropic's content-block stream comes
out as the same deltas the ``openai:`` provider yields (content, reasoning,
tool-call fragments). Only a stream that reached ``message_stop`` with a
``stop_reason`` is a finish: a cut-off answer is an error, never "complete".
Cancelling the consuming task closes the SDK's stream and the HTTP connection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
from anthropic import AsyncAnthropic
from anthropic.types import (
    InputJSONDelta,
    MessageDeltaUsage,
    RawContentBlockDelta,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from anthropic.types.raw_content_block_start_event import ContentBlock as StartBlock

from tokenrelay.shared.errors import ProviderError, UpstreamError
from tokenrelay.shared.settings import Settings
from tokenrelay.worker.providers.base import Chunk, Delta, Finish, GenerationRequest

DEFAULT_BASE_URL = "https://api.anthropic.com"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# An ``error`` event inside a 200 stream carries only its type; the status it stands for.
ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class AnthropicProvider:
    def __init__(self, base_url: str | None, api_key: str | None, max_tokens: int = 1024,
                 timeout_s: float = 600.0):
        self._max_tokens = max_tokens
        self._client = AsyncAnthropic(
            # Both given explicitly, so the SDK reads no credentials or URL of its own.
            base_url=base_url or DEFAULT_BASE_URL,
            api_key=api_key or "unset",
            max_retries=0,  # a retry after partial output would duplicate text
            timeout=timeout_s,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> AnthropicProvider:
        return cls(settings.anthropic_base_url, settings.anthropic_api_key,
                   settings.anthropic_max_tokens)

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        params = request_params(request, self._max_tokens)
        translator = StreamTranslator()
        try:
            stream = await self._client.messages.create(stream=True, **params)
            async with stream:
                async for event in stream:
                    for delta in translator.feed(event):
                        yield delta
                    if translator.stopped:
                        break  # the answer is whole; don't wait for the server to hang up
        except anthropic.APIError as exc:
            raise upstream_error(exc) from exc
        yield translator.finish()


def upstream_error(exc: anthropic.APIError) -> UpstreamError:
    """Retryable unless the upstream refused the request itself (bad input, auth, not found)."""
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        if status < 400:  # an `error` event in the middle of a stream
            status = ERROR_TYPE_STATUS.get(exc.type or "", 500)
        return UpstreamError.for_status(status, f"anthropic: HTTP {status}: {exc.message}")
    if isinstance(exc, anthropic.APIConnectionError):  # timeouts included
        return UpstreamError("could not reach the anthropic upstream",
                             detail=f"anthropic: {exc.message}")
    return UpstreamError("the anthropic upstream answered badly", retryable=False,
                         detail=f"anthropic: {exc.message}")


# ---- the request: OpenAI's shape in, Anthropic's out ------------------------------------------


def request_params(request: GenerationRequest, default_max_tokens: int) -> dict[str, Any]:
    """The keyword arguments of ``messages.create`` for ``request``.

    ``temperature`` is not sent: Anthropic's current API version rejects every sampling
    parameter (and the SDK no longer has them). ``stop`` becomes ``stop_sequences``;
    ``top_p``, ``seed``, the penalties and ``response_format`` have no Anthropic
    counterpart here and are not sent.
    """
    system, messages = convert_messages(request.messages)
    params: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_tokens": request.max_tokens or default_max_tokens,
    }
    if system:
        params["system"] = system
    stop = request.extra.get("stop")
    if stop:
        params["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = request.extra.get("tools")
    if tools:
        params["tools"] = [convert_tool(tool) for tool in tools]
    tool_choice = request.extra.get("tool_choice")
    if tool_choice is not None:
        params["tool_choice"] = convert_tool_choice(tool_choice)
    return params


def convert_messages(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI chat messages as Anthropic's ``system`` text and alternating turns.

    System (and developer) messages join the ``system`` parameter; tool results become
    ``tool_result`` blocks of a user turn; consecutive turns of one role merge into one,
    which is how Anthropic wants parallel tool results (all in the next user turn).
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = _text(content)
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _content_blocks(content)
        elif role == "assistant":
            blocks = _content_blocks(content) + [
                _tool_use(call) for call in message.get("tool_calls") or []
            ]
        elif role == "tool":
            role = "user"
            blocks = [{"type": "tool_result", "tool_use_id": message.get("tool_call_id", ""),
                       "content": _text(content)}]
        else:
            raise ProviderError(f"anthropic: unsupported message role {role!r}")
        if not blocks:
            continue  # Anthropic rejects empty turns
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(system), turns


def convert_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI function tool as an Anthropic tool (its JSON schema as ``input_schema``)."""
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        raise ProviderError("anthropic: only tools of type 'function' are supported")
    out: dict[str, Any] = {
        "name": function.get("name", ""),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


def convert_tool_choice(choice: str | dict[str, Any]) -> dict[str, Any]:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    raise ProviderError(f"anthropic: unsupported tool_choice {choice!r}")


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _content_blocks(content: Any) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image((part.get("image_url") or {}).get("url", "")))
        else:
            raise ProviderError(f"anthropic: unsupported content part {kind!r}")
    return blocks


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header.removeprefix("data:").removesuffix(";base64")
        return {"type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ProviderError("anthropic: tool call arguments must be a JSON object")
    return {"type": "tool_use", "id": call.get("id", ""), "name": function.get("name", ""),
            "input": arguments}


# ---- the response: Anthropic's events in, deltas and one Finish out ---------------------------


@dataclass
class _ToolCall:
    index: int  # the OpenAI tool-call index: the count of tool_use blocks before this one
    start_input: dict[str, Any]
    sent_arguments: bool = False


class StreamTranslator:
    """Turns Messages stream events into deltas; knows whether the answer ended properly."""

    def __init__(self) -> None:
        self._tool_calls: dict[int, _ToolCall] = {}  # by content block index
        self._stop_reason: str | None = None
        self._usage: dict[str, int] = {}
        self.stopped = False  # message_stop seen

    def feed(self, event: RawMessageStreamEvent) -> list[Delta]:
        if isinstance(event, RawMessageStartEvent):
            self._add_usage(event.message.usage)
        elif isinstance(event, RawContentBlockStartEvent):
            return self._block_start(event.index, event.content_block)
        elif isinstance(event, RawContentBlockDeltaEvent):
            return self._block_delta(event.index, event.delta)
        elif isinstance(event, RawContentBlockStopEvent):
            return self._block_stop(event.index)
        elif isinstance(event, RawMessageDeltaEvent):
            self._stop_reason = event.delta.stop_reason or self._stop_reason
            self._add_usage(event.usage)
        elif isinstance(event, RawMessageStopEvent):
            self.stopped = True
        return []  # other events (new kinds included) carry nothing for the client

    def finish(self) -> Finish:
        if not self.stopped or self._stop_reason is None:
            raise UpstreamError("anthropic stream ended before message_stop: the answer is cut off")
        return Finish(FINISH_REASONS.get(self._stop_reason, "stop"), self._usage_dict())

    def _block_start(self, index: int, block: StartBlock) -> list[Delta]:
        if isinstance(block, TextBlock) and block.text:
            return [Delta(content=block.text)]
        if isinstance(block, ThinkingBlock) and block.thinking:
            return [Delta(reasoning=block.thinking)]
        if isinstance(block, ToolUseBlock):
            call = _ToolCall(len(self._tool_calls), dict(block.input or {}))
            self._tool_calls[index] = call
            return [Delta(tool_calls=[{
                "index": call.index, "id": block.id, "type": "function",
                "function": {"name": block.name, "arguments": ""},
            }])]
        return []

    def _block_delta(self, index: int, delta: RawContentBlockDelta) -> list[Delta]:
        if isinstance(delta, TextDelta) and delta.text:
            return [Delta(content=delta.text)]
        if isinstance(delta, ThinkingDelta) and delta.thinking:
            return [Delta(reasoning=delta.thinking)]
        call = self._tool_calls.get(index)
        if isinstance(delta, InputJSONDelta) and delta.partial_json and call is not None:
            call.sent_arguments = True
            return [_arguments(call.index, delta.partial_json)]
        return []  # signatures, citations: nothing a chat client shows

    def _block_stop(self, index: int) -> list[Delta]:
        call = self._tool_calls.get(index)
        if call is None or call.sent_arguments:
            return []
        # No input fragments (a tool without parameters): still hand over parseable JSON.
        return [_arguments(call.index, json.dumps(call.start_input))]

    def _add_usage(self, usage: Usage | MessageDeltaUsage) -> None:
        # Counts are cumulative: a later event's value replaces an earlier one.
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                     "output_tokens"):
            value = getattr(usage, name, None)
            if value is not None:
                self._usage[name] = value

    def _usage_dict(self) -> dict[str, int] | None:
        if not self._usage:
            return None
        # Anthropic's input_tokens leave out cached tokens; OpenAI's prompt_tokens include them.
        prompt = sum(self._usage.get(name, 0) for name in (
            "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        completion = self._usage.get("output_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


def _arguments(index: int, fragment: str) -> Delta:
    return Delta(tool_calls=[{"index": index, "function": {"arguments": fragment}}])
