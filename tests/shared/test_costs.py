"""Costs: usage priced per model, exactly, and added up as integers."""

from __future__ import annotations

from tokenrelay.shared import costs

PRICES = {"openai:gpt-4o-mini": (0.15, 0.6), "claude-x": (3.0, 15.0), "fake:echo": (0.0375, 0.1)}


def test_a_model_is_priced_by_its_entry_or_its_bare_name() -> None:
    """'provider:name' first, then the bare name; an unknown model has no price."""
    assert costs.price_of(PRICES, "openai:gpt-4o-mini") == (0.15, 0.6)
    assert costs.price_of(PRICES, "anthropic:claude-x") == (3.0, 15.0)
    assert costs.price_of(PRICES, "claude-x") == (3.0, 15.0)
    assert costs.price_of(PRICES, "openai:gpt-5") is None


def test_usage_gets_its_cost_in_usd() -> None:
    """cost = prompt x input price + completion x output price, per million tokens."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 2000, "total_tokens": 3000}
    priced = costs.priced(PRICES, "openai:gpt-4o-mini", usage)
    assert priced == {**usage, "cost": 0.00135}  # 1000 * 0.15e-6 + 2000 * 0.6e-6
    assert costs.priced(PRICES, "openai:gpt-5", usage) is usage
    assert costs.priced(PRICES, "fake:echo", None) is None


def test_units_add_up_exactly() -> None:
    """Units of each generation's cost sum to the units of the total, with no float drift."""
    usages = [{"prompt_tokens": p, "completion_tokens": c} for p in range(1, 40, 7)
              for c in range(3, 90, 11)]
    each = [costs.units_of(costs.priced(PRICES, "fake:echo", dict(u))) for u in usages]
    assert all(isinstance(u, int) for u in each)
    total = sum(u for u in each if u is not None)
    assert total == costs.units(PRICES, "fake:echo", {
        "prompt_tokens": sum(u["prompt_tokens"] for u in usages),
        "completion_tokens": sum(u["completion_tokens"] for u in usages)})
    assert costs.units_of({"prompt_tokens": 3}) is None
