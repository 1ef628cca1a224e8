"""What a generation cost: its usage priced by PRICES (USD per million input and output tokens).

A generation's ``usage`` gets ``cost`` (USD) when its model has a price. Totals (a
tenant's, a thread's) add costs as integers of :data:`UNITS_PER_USD`, so a total is
exactly the sum of its generations whatever the order they ended in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Costs are counted in 1e-10 USD: exact for prices with up to 4 decimals per million
# tokens, and a tenant's total fits Redis's 64-bit integers up to ~900 million USD.
UNITS_PER_USD = 10**10
_UNITS_PER_TOKEN = UNITS_PER_USD // 10**6  # per token, at 1 USD per million tokens

Prices = Mapping[str, tuple[float, float]]


def price_of(prices: Prices, model: str) -> tuple[float, float] | None:
    """The price of ``model`` (``provider:name``): its own entry, else one for its bare name."""
    found = prices.get(model)
    if found is None:
        found = prices.get(model.partition(":")[2] or model)
    return found


def units(prices: Prices, model: str, usage: Mapping[str, Any]) -> int | None:
    """The cost of ``usage`` on ``model`` in units; None when the model has no price."""
    price = price_of(prices, model)
    if price is None:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return round((prompt * price[0] + completion * price[1]) * _UNITS_PER_TOKEN)


def usd(units_: int) -> float:
    return units_ / UNITS_PER_USD


def units_of(usage: Mapping[str, Any] | None) -> int | None:
    """The units of a priced usage's ``cost`` (None when it has none)."""
    cost = (usage or {}).get("cost")
    return None if cost is None else round(float(cost) * UNITS_PER_USD)


def priced(prices: Prices, model: str, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """``usage`` with its ``cost`` in USD, when ``model`` has a price."""
    if usage is None:
        return None
    found = units(prices, model, usage)
    return usage if found is None else {**usage, "cost": usd(found)}
