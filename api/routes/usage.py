"""GET /v1/usage: the caller's running totals (tokens, cost, and generations by final status)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from tokenrelay.api.deps import State, Tenant
from tokenrelay.shared import usage

router = APIRouter(prefix="/v1", tags=["usage"])


class UsageTotals(BaseModel):
    tenant: str
    prompt_tokens: int = Field(description="sum over ended generations, as their providers report")
    completion_tokens: int
    total_tokens: int
    generations: dict[str, int] = Field(
        description="ended generations by final status: completed, failed, cancelled"
    )
    cost: float | None = Field(
        None, description="USD over the generations whose model PRICES prices (null: none)")


@router.get("/usage", response_model=UsageTotals,
            responses={401: {"description": "No or bad credentials"}})
async def get_usage(state: State, tenant: Tenant) -> UsageTotals:
    """Totals over every generation of your tenant that has ended, each counted once."""
    found = await usage.totals(state.redis, tenant)
    return UsageTotals(
        tenant=tenant,
        prompt_tokens=found.prompt_tokens,
        completion_tokens=found.completion_tokens,
        total_tokens=found.total_tokens,
        generations=found.generations,
        cost=found.cost,
    )
