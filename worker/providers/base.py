"""The provider interface: a request in, an async stream of deltas and one Finish out.

Providers know nothing about Redis; they raise ``shared.errors.ProviderError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text and OpenAI's tokenizers


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str  # the name after "provider:"
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # tools, tool_choice, ...


def utf8_safe(value: Any) -> Any:
    """``value`` with every lone surrogate (an upstream's bad ``\\ud800`` escape) turned
    into U+FFFD, strings inside lists and dicts included: such a string cannot be written
    to Redis or sent on, and would end the generation."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, list):
        return [utf8_safe(item) for item in value]
    if isinstance(value, dict):
        return {key: utf8_safe(item) for key, item in value.items()}
    return value


@dataclass(frozen=True, slots=True)
class Delta:
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def as_event(self) -> dict[str, Any]:
        """The data of the ``delta`` event that carries this delta (as text UTF-8 can carry)."""
        data: dict[str, Any] = {}
        if self.content:
            data["content"] = utf8_safe(self.content)
        if self.reasoning:
            data["reasoning"] = utf8_safe(self.reasoning)
        if self.tool_calls:
            data["tool_calls"] = utf8_safe(self.tool_calls)
        return data

    def size(self) -> int:
        """Characters of output in this delta (text, reasoning, tool-call arguments)."""
        if not self.tool_calls:  # the common case, once per token: no generator
            return len(self.content or "") + len(self.reasoning or "")
        arguments = sum(len((call.get("function") or {}).get("arguments") or "")
                        for call in self.tool_calls or [])
        return len(self.content or "") + len(self.reasoning or "") + arguments


class ToolCallFragments:
    """Per stream: tool-call fragments as OpenAI streams them, a call's id and name once.

    Some upstreams (llama.cpp's servers) repeat the call's id and whole name in every
    fragment; a client that accumulates fragments, as the openai SDK and tokenrelay's
    facade do, would read ``get_weatherget_weather``. An id or name equal to the one the
    call already has is dropped from a later fragment; a different name extends it (a
    name sent in pieces).
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[int, tuple[str, str]] = {}  # index -> (id, name so far)

    def once(self, fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for fragment in fragments:
            index = int(fragment.get("index", 0))
            seen_id, seen_name = self._calls.get(index, ("", ""))
            function = fragment.get("function") or {}
            name = function.get("name") or ""
            if fragment.get("id") and fragment["id"] == seen_id:
                fragment = {k: v for k, v in fragment.items() if k != "id"}
            if name and name == seen_name:
                fragment = {**fragment, "function": {k: v for k, v in function.items()
                                                     if k != "name"}}
            elif name:
                seen_name += name
            self._calls[index] = (seen_id or fragment.get("id") or "", seen_name)
            out.append(fragment)
        return out


@dataclass(frozen=True, slots=True)
class Finish:
    finish_reason: str
    # prompt_tokens, completion_tokens, total_tokens; "estimated": True when counted here
    usage: dict[str, Any] | None = None


Chunk = Delta | Finish


class Provider(Protocol):
    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield deltas as they arrive, then exactly one Finish last.

        A Finish means the model said it ended (its finish reason). A stream that
        stops without one raises ``UpstreamIncomplete`` instead; any other failure
        raises a ``ProviderError``: a cut-off answer is never reported complete.
        """
        ...

    async def aclose(self) -> None: ...


def estimate_usage(messages: list[dict[str, Any]], completion_chars: int) -> dict[str, Any]:
    """Usage for an upstream that reported none: characters / 4, rounded up, marked estimated.

    The prompt counts every message's content (parts and tool calls as their JSON).
    """
    prompt_chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            prompt_chars += len(content)
        elif content is not None:
            prompt_chars += len(json.dumps(content))
        if message.get("tool_calls"):
            prompt_chars += len(json.dumps(message["tool_calls"]))
    prompt = math.ceil(prompt_chars / CHARS_PER_TOKEN)
    completion = math.ceil(completion_chars / CHARS_PER_TOKEN)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "estimated": True}
