"""Settings are strict: a wrong value names the variable, API keys map to tenants."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from tokenrelay.shared.settings import Settings


def test_api_keys_map_keys_to_tenants(monkeypatch: pytest.MonkeyPatch) -> None:
    """TOKENRELAY_API_KEYS 'tenant:key' pairs map each key to its tenant."""
    monkeypatch.setenv("TOKENRELAY_API_KEYS", "acme:k1, globex:k2")
    assert Settings().tenants_by_key() == {"k1": "acme", "k2": "globex"}


@pytest.mark.parametrize(("name", "value"), [("TOKENRELAY_API_KEYS", "nocolon"),
                                             ("TOKENRELAY_HEARTBEAT_S", "soon"),
                                             ("TOKENRELAY_RETENTION_S", "-5"),
                                             ("TOKENRELAY_PRICES", '{"fake:echo": [1]}'),
                                             ("TOKENRELAY_PRICES", '{"fake:echo": [1, -2]}'),
                                             ("TOKENRELAY_PRESENCE_TTL_S", "0.5"),
                                             ("TOKENRELAY_OPENAI_ON_DISCONNECT", "keep")])
def test_bad_values_stop_start_up(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """A wrong value raises a validation error that names the setting."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert name.removeprefix("TOKENRELAY_").lower() in str(info.value)


def test_prices_are_json_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """PRICES maps each model to its USD per million input and output tokens."""
    monkeypatch.setenv("TOKENRELAY_PRICES", '{"openai:gpt-4o-mini": [0.15, 0.6]}')
    assert Settings().prices == {"openai:gpt-4o-mini": (0.15, 0.6)}
    monkeypatch.setenv("TOKENRELAY_PRICES", "cheap")
    with pytest.raises(SettingsError, match="prices"):
        Settings()


def test_stream_token_ttl_defaults_to_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAM_TOKEN_TTL_S defaults to RETENTION_S."""
    monkeypatch.setenv("TOKENRELAY_RETENTION_S", "123")
    assert Settings().token_ttl_s == 123


def test_models_list_includes_configured_openai_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1/models lists the fake models, plus openai:NAME for each configured name."""
    from tokenrelay.shared.models import listed_models

    assert listed_models(Settings()) == ["fake:echo", "fake:lorem", "fake:error"]
    monkeypatch.setenv("TOKENRELAY_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("TOKENRELAY_OPENAI_MODELS", "gpt-x, qwen-y")
    assert listed_models(Settings())[-2:] == ["openai:gpt-x", "openai:qwen-y"]


def test_anthropic_key_falls_back_to_the_sdk_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """ANTHROPIC_API_KEY configures anthropic: models; TOKENRELAY_ANTHROPIC_API_KEY wins over it."""
    from tokenrelay.shared.models import check_model

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("TOKENRELAY_ANTHROPIC_API_KEY", raising=False)
    assert check_model("anthropic:claude-x", Settings()) is not None
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sdk-key")
    assert Settings().anthropic_api_key == "sdk-key"
    assert check_model("anthropic:claude-x", Settings()) is None
    monkeypatch.setenv("TOKENRELAY_ANTHROPIC_API_KEY", "ours")
    assert Settings().anthropic_api_key == "ours"
