"""Admission limits kept in Redis, so they hold across every API process."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from tokenrelay.shared import keys
from tokenrelay.shared.redis import Script, awaited, text

# Admit a generation if the tenant has fewer than ARGV[1] active ones. Entries
# carry a give-up time as score, so one whose release was missed (a lost
# worker) stops counting by itself.
# KEYS: tenant_active ; ARGV: limit now deadline gen_id ttl
_ADMIT = Script("""
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
""")


async def admit(redis: Redis, tenant: str, gen_id: str, limit: int, hold_s: float) -> bool:
    """Count ``gen_id`` against the tenant's concurrency limit; False if over it."""
    now = time.time()
    admitted = await _ADMIT(redis, [keys.tenant_active(tenant)], str(limit), str(now),
                            str(now + hold_s), gen_id, str(int(hold_s) + 60))
    return bool(admitted)


async def release(redis: Redis, tenant: str, gen_id: str) -> None:
    await redis.zrem(keys.tenant_active(tenant), gen_id)


async def release_generation(redis: Redis, gen_id: str) -> None:
    """Release an ended generation's slot, looking its tenant up."""
    tenant = await awaited(redis.hget(keys.meta(gen_id), "tenant"))
    if tenant is not None:
        await release(redis, text(tenant), gen_id)
