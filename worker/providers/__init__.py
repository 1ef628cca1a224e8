"""LLM providers behind one small interface; ``resolve`` picks one by ``provider:name``."""

from __future__ import annotations

from tokenrelay.shared.errors import UnknownModel
from tokenrelay.worker.providers.base import Chunk, Delta, Finish, GenerationRequest, Provider

__all__ = ["Chunk", "Delta", "Finish", "GenerationRequest", "Provider", "Providers"]


class Providers:
    """The providers one worker process serves, keyed by the part of ``model`` before ':'.

    A bare name (no ':') goes to ``default``, if any (``shared.models.default_provider``).
    """

    def __init__(self, providers: dict[str, Provider], default: str | None = None):
        self._providers = providers
        self._default = default

    def resolve(self, model: str) -> tuple[Provider, str]:
        prefix, sep, name = model.partition(":")
        if not sep and self._default is not None:
            prefix, sep, name = self._default, ":", model
        provider = self._providers.get(prefix) if sep else None
        if provider is None or not name:
            raise UnknownModel(f"unknown model {model!r}")
        return provider, name

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
