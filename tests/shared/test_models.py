"""Which model names a deployment serves: the default provider and the upstream's model list."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_upstream import Record, fake_upstream
from tokenrelay.cli.redis_server import free_port
from tokenrelay.shared import models
from tokenrelay.shared.errors import UnknownModel
from tokenrelay.shared.models import available_models, check_model, default_provider
from tokenrelay.shared.settings import Settings
from tokenrelay.worker.providers import Providers
from tokenrelay.worker.providers.fake import FakeProvider


@pytest.fixture(autouse=True)
def no_upstream_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "TOKENRELAY_OPENAI_API_KEY", "TOKENRELAY_OPENAI_BASE_URL",
                 "TOKENRELAY_OPENAI_MODELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(models, "_upstream_models", {})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, Record]]:
    with fake_upstream() as found:
        yield found


def test_a_bare_name_needs_a_configured_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpt-4o-mini` is refused with no upstream, and means `openai:gpt-4o-mini` with one."""
    problem = check_model("gpt-4o-mini", Settings())
    assert problem is not None and "provider:name" in problem
    monkeypatch.setenv("TOKENRELAY_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert default_provider(Settings()) == "openai"
    assert check_model("gpt-4o-mini", Settings()) is None
    assert check_model("nope:x", Settings()) is not None  # a prefix still names a provider


def test_the_standard_openai_api_key_configures_the_upstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OPENAI_API_KEY counts when TOKENRELAY_OPENAI_API_KEY is unset, and loses to it when set."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-standard")
    assert Settings().openai_api_key == "sk-standard"
    assert check_model("gpt-4o-mini", Settings()) is None
    monkeypatch.setenv("TOKENRELAY_OPENAI_API_KEY", "sk-ours")
    assert Settings().openai_api_key == "sk-ours"


def test_worker_resolves_a_bare_name_to_the_default_provider() -> None:
    """Providers.resolve sends a bare name to the default provider, and refuses it without one."""
    fake = FakeProvider(tps=100, ttft_s=0)
    assert Providers({"fake": fake}, default="fake").resolve("echo") == (fake, "echo")
    assert Providers({"fake": fake}, default="fake").resolve("fake:lorem") == (fake, "lorem")
    with pytest.raises(UnknownModel):
        Providers({"fake": fake}).resolve("echo")


async def test_models_come_from_the_upstream_when_not_configured(
    monkeypatch: pytest.MonkeyPatch, upstream: tuple[str, Record]
) -> None:
    """Without TOKENRELAY_OPENAI_MODELS, /v1/models lists the upstream's models, asked once a
    minute at most; with it, the configured names and no upstream call."""
    url, record = upstream
    monkeypatch.setenv("TOKENRELAY_OPENAI_BASE_URL", url)
    before = record.model_lists
    listed = await available_models(Settings())
    assert listed == ["fake:echo", "fake:lorem", "fake:error", "openai:model-a", "openai:model-b"]
    assert await available_models(Settings()) == listed
    assert record.model_lists == before + 1
    monkeypatch.setenv("TOKENRELAY_OPENAI_MODELS", "mine")
    assert (await available_models(Settings()))[-1] == "openai:mine"
    assert record.model_lists == before + 1


async def test_an_unreachable_upstream_lists_only_the_fake_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the upstream's list cannot be had, /v1/models still answers, with the fake models."""
    monkeypatch.setenv("TOKENRELAY_OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    assert await available_models(Settings()) == ["fake:echo", "fake:lorem", "fake:error"]


def test_the_fake_models_can_be_turned_off() -> None:
    """FAKE_MODELS=false: fake:* is refused, listed nowhere, and no worker serves it."""
    from tokenrelay.worker.context import build_providers

    off = Settings(fake_models=False)
    assert "turned off" in (check_model("fake:echo", off) or "")
    assert check_model("fake:echo", Settings()) is None
    assert not [m for m in models.listed_models(off) if m.startswith("fake:")]
    with pytest.raises(UnknownModel):
        build_providers(off).resolve("fake:echo")
