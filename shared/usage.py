"""Per-tenant usage: tokens and generations by final status, each generation counted once.

``record`` is called after a terminal event was written (by the worker; and by a
job that finds its generation already ended, which covers cancels of queued
generations and a worker lost between the terminal write and the count). It
reads what the terminal write left in the status hash, and adds it to the
tenant's totals in one Lua script guarded by a per-generation marker, so calling
it again is harmless. The totals and the marker share the tenant's hash tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from tokenrelay.shared import costs, keys
from tokenrelay.shared import events as ev
from tokenrelay.shared.redis import Script, awaited, text

STATUS_PREFIX = "generations:"
# The marker outlives the generation's own keys (RETENTION_S), so no re-run can count it again.
MARKER_SLACK_S = 3600

# KEYS: totals marker ; ARGV: marker_ttl status prompt completion total cost_units('': unpriced)
_RECORD = Script("""
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'generations:' .. ARGV[2], 1)
redis.call('HINCRBY', KEYS[1], 'prompt_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'completion_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'total_tokens', ARGV[5])
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[1], 'cost_units', ARGV[6]) end
return 1
""")


@dataclass(frozen=True, slots=True)
class Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    generations: dict[str, int] = field(default_factory=dict)
    cost: float | None = None  # USD, over the priced generations (None: none was priced)


def _tokens(usage: dict[str, Any]) -> tuple[int, int, int]:
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    total = int(usage.get("total_tokens") or prompt + completion)
    return prompt, completion, total


async def record(redis: Redis, gen_id: str, retention_s: int) -> bool:
    """Add an ended generation to its tenant's totals; False if not ended or counted already."""
    raw = await awaited(redis.hmget(keys.meta(gen_id), ["tenant", "status", "usage"]))
    tenant, status, usage = (None if v is None else text(v) for v in raw)
    if tenant is None or status not in ev.TERMINAL_STATUSES:
        return False
    found = (json.loads(usage) if usage else None) or {}
    prompt, completion, total = _tokens(found)
    cost = costs.units_of(found)
    script_keys = [keys.usage(tenant), keys.usage_counted(tenant, gen_id)]
    args = [str(retention_s + MARKER_SLACK_S), status, str(prompt), str(completion), str(total),
            "" if cost is None else str(cost)]
    counted = await _RECORD(redis, script_keys, *args)
    return bool(counted)


async def totals(redis: Redis, tenant: str) -> Totals:
    """A tenant's totals so far (zeros for a tenant with no ended generation)."""
    raw = await awaited(redis.hgetall(keys.usage(tenant)))
    values = {text(k): int(v) for k, v in raw.items()}
    generations = {status: values.get(STATUS_PREFIX + status, 0)
                   for status in sorted(ev.TERMINAL_STATUSES)}
    return Totals(
        prompt_tokens=values.get("prompt_tokens", 0),
        completion_tokens=values.get("completion_tokens", 0),
        total_tokens=values.get("total_tokens", 0),
        generations=generations,
        cost=costs.usd(values["cost_units"]) if "cost_units" in values else None,
    )
