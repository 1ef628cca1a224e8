"""Which models a deployment serves: ``provider:name``, checked by the API before enqueueing."""

from __future__ import annotations

from tokenrelay.shared.settings import Settings

FAKE_MODELS = ("echo", "lorem", "error")


def check_model(model: str, settings: Settings) -> str | None:
    """None if ``model`` can be served here, else a message saying why not."""
    provider, sep, name = model.partition(":")
    if not sep or not name:
        return f"model must be 'provider:name', got {model!r}"
    if provider == "fake":
        if name not in FAKE_MODELS:
            return f"unknown fake model {name!r}; one of: {', '.join(FAKE_MODELS)}"
        return None
    if provider == "openai":
        if not (settings.openai_base_url or settings.openai_api_key):
            return "provider 'openai' is not configured (TOKENRELAY_OPENAI_BASE_URL)"
        return None
    if provider == "anthropic":
        if not (settings.anthropic_base_url or settings.anthropic_api_key):
            return "provider 'anthropic' is not configured (TOKENRELAY_ANTHROPIC_API_KEY)"
        return None
    return f"unknown provider {provider!r}; one of: fake, openai, anthropic"


def listed_models(settings: Settings) -> list[str]:
    """The models /v1/models lists: the fake ones, and the configured ``openai:`` names."""
    models = [f"fake:{name}" for name in FAKE_MODELS]
    if settings.openai_models and check_model("openai:x", settings) is None:
        names = (n.strip() for n in settings.openai_models.split(","))
        models += [f"openai:{name}" for name in names if name]
    return models
