"""Which models a deployment serves: ``provider:name``, checked by the API before enqueueing.

A bare name (``gpt-4o-mini``) means the default provider's model: ``openai:`` once an
upstream is configured (a base URL or an API key), else it is refused.

``model`` may also be an ordered list of fallbacks, comma separated
(``openai:gpt-4o-mini,anthropic:claude-3-5-haiku-latest``): the worker tries the next
one when a model fails retryably before its first token.
"""

from __future__ import annotations

import logging
import time

import openai

from tokenrelay.shared.errors import one_line
from tokenrelay.shared.settings import Settings

logger = logging.getLogger(__name__)

FAKE_MODELS = ("echo", "lorem", "error")
MAX_FALLBACKS = 4
# How long the upstream's model list is reused, and how long one fetch may take.
UPSTREAM_MODELS_TTL_S = 60.0
UPSTREAM_MODELS_TIMEOUT_S = 5.0


def default_provider(settings: Settings) -> str | None:
    """The provider of a bare model name: ``openai`` when an upstream is configured."""
    return "openai" if settings.openai_base_url or settings.openai_api_key else None


def candidates(model: str) -> list[str]:
    """The models ``model`` names, in the order they are tried (one, or its fallbacks)."""
    return [name.strip() for name in model.split(",")]


def check_model(model: str, settings: Settings) -> str | None:
    """None if ``model`` (or each of its fallbacks) can be served here, else why not."""
    names = candidates(model)
    if len(names) > 1:
        if len(names) > MAX_FALLBACKS:
            return f"at most {MAX_FALLBACKS} models in a fallback list, got {len(names)}"
        problems = (check_model(name, settings) for name in names)
        return next((f"in the fallback list {model!r}: {p}" for p in problems if p), None)
    provider, sep, name = model.partition(":")
    if not sep:
        if model and default_provider(settings) is not None:
            return None
        return (f"model must be 'provider:name', got {model!r} (a bare name needs an upstream: "
                "TOKENRELAY_OPENAI_BASE_URL or an API key)")
    if not name:
        return f"model must be 'provider:name', got {model!r}"
    if provider == "fake":
        if not settings.fake_models:
            return "the fake: models are turned off here (TOKENRELAY_FAKE_MODELS=false)"
        if name not in FAKE_MODELS:
            return f"unknown fake model {name!r}; one of: {', '.join(FAKE_MODELS)}"
        return None
    if provider == "openai":
        if default_provider(settings) is None:
            return "provider 'openai' is not configured (TOKENRELAY_OPENAI_BASE_URL)"
        return None
    if provider == "anthropic":
        if not (settings.anthropic_base_url or settings.anthropic_api_key):
            return "provider 'anthropic' is not configured (TOKENRELAY_ANTHROPIC_API_KEY)"
        return None
    return (f"unknown provider {provider!r}; one of: fake, openai, anthropic "
            f"(an upstream's model with ':' in its name: 'openai:{model}')")


def listed_models(settings: Settings) -> list[str]:
    """The models /v1/models lists: the fake ones, and the configured ``openai:`` names."""
    models = [f"fake:{name}" for name in FAKE_MODELS] if settings.fake_models else []
    if settings.openai_models and default_provider(settings) is not None:
        names = (n.strip() for n in settings.openai_models.split(","))
        models += [f"openai:{name}" for name in names if name]
    return models


# (base_url, api_key) -> (fetched at, the upstream's model ids)
_upstream_models: dict[tuple[str | None, str | None], tuple[float, list[str]]] = {}


async def available_models(settings: Settings) -> list[str]:
    """``listed_models``; without TOKENRELAY_OPENAI_MODELS, the upstream's own list instead.

    The upstream's ``GET /models`` is asked at most once a minute; when it fails, the
    list has only the fake models (logged), and the next call asks again.
    """
    models = listed_models(settings)
    if settings.openai_models or default_provider(settings) is None:
        return models
    key = (settings.openai_base_url, settings.openai_api_key)
    cached = _upstream_models.get(key)
    if cached is not None and time.monotonic() - cached[0] < UPSTREAM_MODELS_TTL_S:
        return models + cached[1]
    names = await _fetch_upstream_models(settings)
    if names is None:
        return models
    _upstream_models[key] = (time.monotonic(), names)
    return models + names


async def _fetch_upstream_models(settings: Settings) -> list[str] | None:
    client = openai.AsyncOpenAI(
        base_url=settings.openai_base_url,
        api_key=settings.openai_api_key or "unset",
        max_retries=0,
        timeout=UPSTREAM_MODELS_TIMEOUT_S,
    )
    try:
        page = await client.models.list()
        return sorted(f"openai:{model.id}" for model in page.data)
    except openai.APIError as exc:
        logger.warning("could not list the upstream's models at %s: %s",
                       client.base_url, one_line(str(exc)))
        return None
    finally:
        await client.close()
