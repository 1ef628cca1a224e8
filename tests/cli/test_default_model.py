"""TOKENRELAY_DEFAULT_MODEL: the model of a request that names none, through the API and
through `tokenrelay chat` (which leaves the choice to the server unless --model is given)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.cli.terminal import gen_id_in, run
from tests.client import status
from tests.stack import Stack, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lorem_default() -> Iterator[Stack]:
    """A deployment whose default model is fake:lorem (not the built-in fake:echo)."""
    s = Stack(apis=1, workers=1, env={"TOKENRELAY_DEFAULT_MODEL": "fake:lorem",
                                      "TOKENRELAY_FAKE_TPS": "200"})
    yield s
    s.stop()


def done(url: str, gen_id: str) -> dict[str, object]:
    return wait_for(lambda: (s := status(url, gen_id))["status"] == "completed" and s, 20,
                    what="the generation to complete")


def test_a_request_without_a_model_gets_the_default(lorem_default: Stack) -> None:
    """POST /v1/generations with only a prompt is accepted and runs the default model."""
    response = httpx.post(f"{lorem_default.url}/v1/generations",
                          json={"prompt": "hi", "max_tokens": 5}, timeout=10)
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["model"] == "fake:lorem"
    final = done(lorem_default.url, created["id"])
    assert final["model"] == "fake:lorem"
    assert len(str(final["content"]).split()) == 5  # lorem words, not the echoed prompt


def test_the_default_default_is_fake_echo(stack: Stack) -> None:
    """Unset, the default model is fake:echo: a bare prompt is echoed back."""
    response = httpx.post(f"{stack.url}/v1/generations", json={"prompt": "hi there"},
                          timeout=10)
    assert response.status_code == 202, response.text
    assert response.json()["model"] == "fake:echo"
    assert done(stack.url, response.json()["id"])["content"] == "hi there"


def test_an_explicit_model_still_wins(lorem_default: Stack) -> None:
    """A request that names a model gets that model, whatever the default."""
    created = httpx.post(f"{lorem_default.url}/v1/generations",
                         json={"prompt": "echo me", "model": "fake:echo"}, timeout=10).json()
    assert created["model"] == "fake:echo"
    assert done(lorem_default.url, created["id"])["content"] == "echo me"


def test_chat_without_model_uses_the_servers_default(lorem_default: Stack) -> None:
    """`tokenrelay chat` with no --model sends none, so the server's default answers."""
    cli = run("chat", "hello", "--max-tokens", "4", "--url", lorem_default.url)
    assert cli.popen.returncode == 0, cli.err.text
    final = status(lorem_default.url, gen_id_in(cli.err.text))
    assert final["model"] == "fake:lorem"
    assert cli.stdout == final["content"] and len(cli.stdout.split()) == 4
