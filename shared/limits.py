"""Admission limits kept in Redis, so they hold across every API process."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from tokenrelay.shared import keys
from tokenrelay.shared.redis import awaited

# Admit a generation if the tenant has fewer than ARGV[1] active ones. Entries
# carry a give-up time as score, so one whose release was missed (a lost
# worker) stops counting by itself.
# KEYS: tenant_active ; ARGV: limit now deadline gen_id ttl
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


async def admit(redis: Redis, tenant: str, gen_id: str, limit: int, hold_s: float) -> bool:
    """Count ``gen_id`` against the tenant's concurrency limit; False if over it."""
    now = time.time()
    admitted = await awaited(redis.eval(
        _ADMIT, 1, keys.tenant_active(tenant), str(limit), str(now), str(now + hold_s), gen_id,
        str(int(hold_s) + 60),
    ))
    return bool(admitted)


async def release(redis: Redis, tenant: str, gen_id: str) -> None:
    await redis.zrem(keys.tenant_active(tenant), gen_id)


async def release_generation(redis: Redis, gen_id: str) -> None:
    """Release an ended generation's slot, looking its tenant up."""
    tenant = await awaited(redis.hget(keys.meta(gen_id), "tenant"))
    if tenant is not None:
        await release(redis, tenant.decode() if isinstance(tenant, bytes) else str(tenant), gen_id)


# Take a place in the queue if it holds fewer than ARGV[1] jobs, in one step, so a burst
# of concurrent creates cannot all pass a separate count. The place is the job's own
# entry, scored in the future so no worker takes it before the job is written (which
# re-scores it to now); one whose create died is dropped by arq as expired.
# KEYS: queue ; ARGV: limit gen_id score
_RESERVE = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
"""
# A reservation's job becomes due this long after a create that died before writing it.
RESERVATION_MS = 60_000


async def reserve_queue_slot(queue: Redis, queue_name: str, gen_id: str, limit: int) -> bool:
    """Hold a place for ``gen_id``'s job (queued or running jobs count); False if full."""
    score = int(time.time() * 1000) + RESERVATION_MS
    reserved = await awaited(queue.eval(_RESERVE, 1, queue_name, str(limit), gen_id, str(score)))
    return bool(reserved)


async def release_queue_slot(queue: Redis, queue_name: str, gen_id: str) -> None:
    """Give a reserved place back (the create did not happen)."""
    await queue.zrem(queue_name, gen_id)


async def queue_depth(redis: Redis, queue_name: str) -> int:
    depth: int = await redis.zcard(queue_name)
    return depth
