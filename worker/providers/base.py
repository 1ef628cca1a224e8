"""The provider interface: a request in, an async stream of deltas and one Finish out.

Providers know nothing about Redis; they raise ``shared.errors.ProviderError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str  # the name after "provider:"
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # tools, tool_choice, ...


@dataclass(frozen=True, slots=True)
class Delta:
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def as_event(self) -> dict[str, Any]:
        """The data of the ``delta`` event that carries this delta."""
        data: dict[str, Any] = {}
        if self.content:
            data["content"] = self.content
        if self.reasoning:
            data["reasoning"] = self.reasoning
        if self.tool_calls:
            data["tool_calls"] = self.tool_calls
        return data


@dataclass(frozen=True, slots=True)
class Finish:
    finish_reason: str
    usage: dict[str, int] | None = None


Chunk = Delta | Finish


class Provider(Protocol):
    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Yield deltas as they arrive, then exactly one Finish last."""
        ...

    async def aclose(self) -> None: ...
