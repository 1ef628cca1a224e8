"""Appending to and reading from a generation's stream, atomically with its status.

Writers go through Lua scripts so that each append checks the generation's state
and the writer's attempt (fencing) in the same step: a stale attempt, or any
write after the terminal event, is refused by Redis itself.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, queue
from tokenrelay.shared.redis import Script, lua_set, text

# Scripts open with ``if TERMINAL[st]``: an ended generation's statuses, from shared.events.
_TERMINAL = f"local TERMINAL = {lua_set(ev.TERMINAL_STATUSES)}"

# KEYS: meta events ; ARGV: ttl first_type first_data [field value ...]
_CREATE = Script("""
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local id = redis.call('XADD', KEYS[2], '*', 't', ARGV[2], 'd', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return id
""")

# KEYS: meta events content ; ARGV: attempt now ttl run
# ``run`` (random per job run) lets a retried start whose reply was lost find itself.
_START = Script(f"""
{_TERMINAL}
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {{0, 'missing'}} end
if TERMINAL[st] then return {{0, st}} end
local m = redis.call('HMGET', KEYS[1], 'attempt', 'run')
local prev = tonumber(m[1] or '0')
if tonumber(ARGV[1]) == prev and m[2] == ARGV[4] then return {{1, 'already'}} end
if tonumber(ARGV[1]) <= prev then return {{0, 'stale'}} end
redis.call('HSET', KEYS[1], 'attempt', ARGV[1], 'status', 'running', 'started_at', ARGV[2],
  'seq', '0', 'run', ARGV[4])
redis.call('SET', KEYS[3], '', 'EX', ARGV[3])
if st == 'running' then
  redis.call('XADD', KEYS[2], '*', 't', 'status', 'd',
    '{{"status":"restarted","attempt":' .. ARGV[1] .. '}}')
end
return {{1, redis.call('XADD', KEYS[2], '*', 't', 'status', 'd', '{{"status":"running"}}')}}
""")

# The deltas of one or more generations in one call (a worker's writer batches what all
# its generations produced since its last call).
# KEYS: per generation: meta events content ;
# ARGV: per generation: attempt first_seq n, then n times: data_json text
# Entry i of a generation has sequence number first_seq + i (1, 2, ... per attempt); an
# entry at or below the stored ``seq`` was applied already (a retry whose first reply was
# lost) and is skipped, so a retried batch never appends twice. A generation that is not
# running under this attempt (fenced, or ended) writes nothing and answers 0, else 1.
_DELTAS = Script("""
local out = {}
local a = 1
for g = 1, #KEYS, 3 do
  local first, n = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local m = redis.call('HMGET', KEYS[g], 'status', 'attempt', 'seq')
  local ok = 0
  if m[1] == 'running' and m[2] == ARGV[a] then
    ok = 1
    local done = tonumber(m[3] or '0')
    local texts = {}
    for i = 0, n - 1 do
      if first + i > done then
        redis.call('XADD', KEYS[g + 1], '*', 't', 'delta', 'd', ARGV[a + 3 + 2 * i])
        texts[#texts + 1] = ARGV[a + 4 + 2 * i]
      end
    end
    if first + n - 1 > done then
      local joined = table.concat(texts)
      if joined ~= '' then redis.call('APPEND', KEYS[g + 2], joined) end
      redis.call('HSET', KEYS[g], 'seq', first + n - 1)
    end
  end
  out[#out + 1] = ok
  a = a + 3 + 2 * n
end
return out
""")

# KEYS: meta events content cancel ; ARGV: attempt('' = any) type data_json status now
#        retention [field value ...]
_FINISH = Script(f"""
{_TERMINAL}
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt')
local st = m[1]
if not st then return false end
if TERMINAL[st] then return false end
if ARGV[1] ~= '' and m[2] ~= ARGV[1] then return false end
local id = redis.call('XADD', KEYS[2], '*', 't', ARGV[2], 'd', ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[5])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('DEL', KEYS[4])
return id
""")

# KEYS: meta events content cancel ; ARGV: tenant now retention ttl
_CANCEL = Script(f"""
{_TERMINAL}
local m = redis.call('HMGET', KEYS[1], 'status', 'tenant')
local st = m[1]
if not st or m[2] ~= ARGV[1] then return 'missing' end
if TERMINAL[st] then return 'ended' end
if st == 'queued' then
  redis.call('XADD', KEYS[2], '*', 't', '{ev.CANCELLED}', 'd', '{{}}')
  redis.call('HSET', KEYS[1], 'status', '{ev.STATUS_AFTER[ev.CANCELLED]}', 'finished_at', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return 'cancelled'
end
redis.call('SET', KEYS[4], '1', 'EX', ARGV[4])
return 'requested'
""")


def now() -> float:
    return round(time.time(), 3)


def _gen_keys(gen_id: str) -> list[str]:
    return [keys.meta(gen_id), keys.events(gen_id), keys.content(gen_id), keys.cancel(gen_id)]


@dataclass(frozen=True, slots=True)
class NewGeneration:
    id: str
    tenant: str
    model: str
    request: dict[str, Any]
    created_at: float


async def create(
    redis: Redis, gen: NewGeneration, metadata: dict[str, str] | None = None,
    job: queue.Job | None = None, first: dict[str, Any] | None = None,
) -> str:
    """Write a generation's status and its first event (``status: queued``, plus ``first``'s
    fields); return its id.

    With ``job`` (``queue.first_job``: the queue shares this Redis), also enqueue it
    and wake the workers, atomically and in the same round trip: a generation is never
    recorded without its job, and the queue hop costs one round trip instead of five.
    """
    mapping = {
        "status": ev.QUEUED,
        "tenant": gen.tenant,
        "model": gen.model,
        "created_at": str(gen.created_at),
        "request": json.dumps(gen.request),
        "attempt": "0",
    }
    if metadata:
        mapping["metadata"] = json.dumps(metadata)
    first_event = ev.entry_fields(ev.STATUS, {**(first or {}), "status": ev.QUEUED})
    if job is None:
        # One script on the generation's slot: atomic on a plain Redis and on a Cluster,
        # whose client has no MULTI. The job then goes to the queue's own Redis.
        fields = [item for pair in mapping.items() for item in pair]
        created = await _CREATE(redis, _gen_keys(gen.id)[:2], keys.PENDING_TTL_S,
                                first_event["t"], first_event["d"], *fields)
        return text(created)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.meta(gen.id), mapping=mapping)
        pipe.expire(keys.meta(gen.id), keys.PENDING_TTL_S)
        entry: dict[Any, Any] = first_event
        pipe.xadd(keys.events(gen.id), entry)
        pipe.expire(keys.events(gen.id), keys.PENDING_TTL_S)
        queue.add(pipe, job)
        results = await pipe.execute()
    return text(results[2])


async def start(
    redis: Redis, gen_id: str, attempt: int, run: str = ""
) -> tuple[bool, str]:
    """Mark an attempt running (writing ``restarted`` first if an earlier one had started).

    Returns (started, reason): not started when the generation is terminal, unknown,
    or already claimed by another run of this or a newer attempt. Called again with
    the same ``run`` (its reply was lost), it reports started.
    """
    ok, detail = await _START(
        redis, _gen_keys(gen_id)[:3], attempt, now(), keys.PENDING_TTL_S,
        run or secrets.token_hex(8),
    )
    return bool(ok), text(detail)


@dataclass(frozen=True, slots=True)
class Appends:
    """Entries for one generation's stream: ``entries`` (data JSON, its text) numbered
    ``first_seq``, ``first_seq`` + 1, … within ``attempt``."""

    gen_id: str
    attempt: int
    first_seq: int
    entries: list[tuple[str, str]]


async def append_batch(redis: Redis, batch: list[Appends]) -> list[bool]:
    """Append several generations' deltas in one script (their keys must share a slot on a
    Cluster); per generation, False if this attempt may no longer write (fenced or ended).
    Retrying the same batch never appends an entry twice."""
    names: list[str] = []
    args: list[Any] = []
    for item in batch:
        names += _gen_keys(item.gen_id)[:3]
        args += [item.attempt, item.first_seq, len(item.entries)]
        for data, content in item.entries:
            args += [data, content]
    result = await _DELTAS(redis, names, *args)
    return [bool(ok) for ok in result]


async def append_delta(
    redis: Redis, gen_id: str, attempt: int, data: dict[str, Any], seq: int
) -> bool:
    """Append delta number ``seq`` (1, 2, … per attempt); False if this attempt may no
    longer write (fenced or ended). Retrying the same ``seq`` never appends twice."""
    entry = (ev.dumps(data), data.get("content") or "")
    (ok,) = await append_batch(redis, [Appends(gen_id, attempt, seq, [entry])])
    return ok


async def finish(
    redis: Redis,
    gen_id: str,
    attempt: int | None,
    event_type: str,
    data: dict[str, Any],
    retention_s: int,
    fields: dict[str, str] | None = None,
) -> bool:
    """Write the one terminal event and final status; False if one was written already."""
    extra: list[str] = []
    for name, value in (fields or {}).items():
        extra += [name, value]
    result = await _FINISH(
        redis,
        _gen_keys(gen_id),
        "" if attempt is None else attempt,
        event_type,
        ev.dumps(data),
        ev.STATUS_AFTER[event_type],
        now(),
        retention_s,
        *extra,
    )
    return result is not None


async def request_cancel(redis: Redis, gen_id: str, tenant: str, retention_s: int) -> str:
    """'cancelled' (was queued, ended now), 'requested' (worker will stop), 'ended', 'missing'."""
    result = await _CANCEL(
        redis, _gen_keys(gen_id), tenant, now(), retention_s, keys.PENDING_TTL_S
    )
    return text(result)


async def read_after(
    redis: Redis, gen_id: str, after: str | None, count: int = 1000
) -> list[tuple[Any, dict[Any, Any]]]:
    """Entries strictly after ``after`` (all when None), at most ``count``."""
    start = "-" if after is None else f"({after}"
    entries: list[tuple[Any, dict[Any, Any]]] = await redis.xrange(
        keys.events(gen_id), min=start, max="+", count=count
    )
    return entries


async def read_status(redis: Redis, gen_id: str) -> tuple[dict[str, str], str] | None:
    """(meta, content) of a generation, or None if it is unknown or expired."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.meta(gen_id))
        pipe.get(keys.content(gen_id))
        raw_meta, raw_content = await pipe.execute()
    if not raw_meta:
        return None
    meta = {text(k): text(v) for k, v in raw_meta.items()}
    return meta, text(raw_content) if raw_content is not None else ""
