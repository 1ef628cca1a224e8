"""Appending to and reading from a generation's stream, atomically with its status.

Status changes go through Lua scripts that check the generation's state and the
writer's attempt (fencing) in the same step. Deltas, the per-token path, are fenced
by their entry ids, so that each costs Redis one XADD and nothing else:

- The worker chooses each delta's id (``ms-seq``): Redis's time as it reads it, never
  below its previous delta's, and never at or past the end of its lease (the liveness
  key it renews; ``worker.lease.RedisClock``).
- An entry written for anyone else (a restart, the terminal event) gets an id at
  Redis's time and above every entry in the stream (:data:`_NEXT_ID`).

Redis refuses an XADD whose id is not above the stream's last one. A newer attempt
starts only after the old one's lease ran out (the reaper waits for its liveness key
to expire), so its ``restarted`` and ``running`` entries are above every id the old
attempt may still choose, and the old attempt's late deltas are refused by Redis
itself: fencing. A delta sent again after a lost reply has its id refused too; the
script tells the two apart by whether that very id is in the stream: exactly once.
The answer's text (``content``) is written once, with the terminal event; until then
it is read from the stream.
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

# An id for an entry written after creation (not a delta): Redis's time now, or one
# millisecond past the stream's last entry if that is later, so that it is above every
# entry, and at or past the end of the lease of any attempt it takes over.
_NEXT_ID = """
local function next_id(key)
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if top then
    local top_ms = tonumber(string.match(top[1], '^%d+'))
    if top_ms >= ms then ms = top_ms + 1 end
  end
  return string.format('%.0f-0', ms)
end
"""

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
# Answers {1, id of the running entry} (the attempt's base: its deltas go above it), or
# {0, why}.
_START = Script(f"""
{_TERMINAL}
{_NEXT_ID}
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {{0, 'missing'}} end
if TERMINAL[st] then return {{0, st}} end
local m = redis.call('HMGET', KEYS[1], 'attempt', 'run', 'base')
local prev = tonumber(m[1] or '0')
if tonumber(ARGV[1]) == prev and m[2] == ARGV[4] then return {{1, m[3] or ''}} end
if tonumber(ARGV[1]) <= prev then return {{0, 'stale'}} end
if st == 'running' then
  redis.call('XADD', KEYS[2], next_id(KEYS[2]), 't', 'status', 'd',
    '{{"status":"restarted","attempt":' .. ARGV[1] .. '}}')
end
local id = next_id(KEYS[2])
redis.call('XADD', KEYS[2], id, 't', 'status', 'd', '{{"status":"running"}}')
redis.call('HSET', KEYS[1], 'attempt', ARGV[1], 'status', 'running', 'started_at', ARGV[2],
  'run', ARGV[4], 'base', id)
redis.call('DEL', KEYS[3])
return {{1, id}}
""")

# The deltas of one or more generations in one call (a worker's writer batches what all
# its generations produced since its last call): one XADD per delta and nothing else.
# KEYS: per generation: events ; ARGV: per generation: n, then n times: id data_json
# An XADD refused for its id means the stream's last entry is at or above it: if the entry
# with that id is in the stream, it was applied already (a retry whose first reply was
# lost) and is skipped; if not, a newer attempt or the terminal event came after the
# attempt's entries: the attempt is fenced. NOMKSTREAM: a stream that is gone (expired,
# deleted) is not made again. Answers per generation 1 (written), else 0.
_DELTAS = Script("""
local out = {}
local a = 1
for g = 1, #KEYS do
  local n = tonumber(ARGV[a])
  local ok = 1
  for i = 0, n - 1 do
    local id = ARGV[a + 1 + 2 * i]
    local r = redis.pcall('XADD', KEYS[g], 'NOMKSTREAM', id, 't', 'delta', 'd', ARGV[a + 2 + 2 * i])
    if not r then ok = 0 break end
    if type(r) == 'table' and r.err then
      if not string.find(r.err, 'equal or smaller', 1, true) then return r end
      if #redis.call('XRANGE', KEYS[g], id, id) == 0 then ok = 0 break end
    end
  end
  out[#out + 1] = ok
  a = a + 1 + 2 * n
end
return out
""")

# KEYS: meta events content cancel ; ARGV: attempt('' = any) type data_json status now
#        retention has_content content [field value ...]
# The answer's text is kept with the terminal event when the caller has it (the worker
# that streamed it); else it stays in the stream (``read_status`` reads it from there).
_FINISH = Script(f"""
{_TERMINAL}
{_NEXT_ID}
local m = redis.call('HMGET', KEYS[1], 'status', 'attempt')
local st = m[1]
if not st then return false end
if TERMINAL[st] then return false end
if ARGV[1] ~= '' and m[2] ~= ARGV[1] then return false end
local id = redis.call('XADD', KEYS[2], next_id(KEYS[2]), 't', ARGV[2], 'd', ARGV[3])
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[5])
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[7] == '1' then redis.call('SET', KEYS[3], ARGV[8]) else redis.call('DEL', KEYS[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('DEL', KEYS[4])
return id
""")

# KEYS: meta events content cancel ; ARGV: tenant now retention ttl
_CANCEL = Script(f"""
{_TERMINAL}
{_NEXT_ID}
local m = redis.call('HMGET', KEYS[1], 'status', 'tenant')
local st = m[1]
if not st or m[2] ~= ARGV[1] then return 'missing' end
if TERMINAL[st] then return 'ended' end
if st == 'queued' then
  redis.call('XADD', KEYS[2], next_id(KEYS[2]), 't', '{ev.CANCELLED}', 'd', '{{}}')
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

    Returns (started, detail): when started, detail is the id of the attempt's
    ``running`` entry (its deltas' ids go above it); not started when the generation is
    terminal, unknown, or already claimed by another run of this or a newer attempt,
    and detail says which. Called again with the same ``run`` (its reply was lost), it
    reports started, with the same base.
    """
    ok, detail = await _START(
        redis, _gen_keys(gen_id)[:3], attempt, now(), keys.PENDING_TTL_S,
        run or secrets.token_hex(8),
    )
    return bool(ok), text(detail)


@dataclass(frozen=True, slots=True)
class Appends:
    """Deltas for one generation's stream: ``entries`` (id, data JSON, text) are the
    attempt's deltas number ``first_seq``, ``first_seq`` + 1, …, in order, each with the
    id its writer chose for it (above the one before)."""

    gen_id: str
    first_seq: int
    entries: list[tuple[str, str, str]]


async def append_batch(redis: Redis, batch: list[Appends]) -> list[bool]:
    """Append several generations' deltas in one script (their keys must share a slot on a
    Cluster); per generation, False if this attempt may no longer write (fenced or ended).
    Retrying the same batch never appends an entry twice."""
    names: list[str] = []
    args: list[Any] = []
    for item in batch:
        names.append(keys.events(item.gen_id))
        args.append(len(item.entries))
        for entry_id, data, _text in item.entries:
            args += [entry_id, data]
    result = await _DELTAS(redis, names, *args)
    return [bool(ok) for ok in result]


async def append_delta(redis: Redis, gen_id: str, entry_id: str, data: dict[str, Any]) -> bool:
    """Append one delta with id ``entry_id``; False if this attempt may no longer write
    (fenced or ended). Retrying the same id never appends twice."""
    entry = (entry_id, ev.dumps(data), data.get("content") or "")
    (ok,) = await append_batch(redis, [Appends(gen_id, 0, [entry])])
    return ok


async def finish(
    redis: Redis,
    gen_id: str,
    attempt: int | None,
    event_type: str,
    data: dict[str, Any],
    retention_s: int,
    fields: dict[str, str] | None = None,
    content: str | None = None,
) -> bool:
    """Write the one terminal event and final status; False if one was written already.

    ``content``: the answer's text as streamed, kept beside the status (None: the caller
    does not have it, and ``read_status`` reads it from the stream)."""
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
        "0" if content is None else "1",
        content or "",
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
    """(meta, content) of a generation, or None if it is unknown or expired. The content
    of an answer still streaming (or ended by someone who did not have its text) is read
    from its stream."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.meta(gen_id))
        pipe.get(keys.content(gen_id))
        raw_meta, raw_content = await pipe.execute()
    if not raw_meta:
        return None
    meta = {text(k): text(v) for k, v in raw_meta.items()}
    if raw_content is not None:
        return meta, text(raw_content)
    return meta, await streamed_text(redis, gen_id)


async def streamed_text(redis: Redis, gen_id: str, page: int = 1000) -> str:
    """The text of the deltas of a generation's latest attempt, read from its stream."""
    parts: list[str] = []
    after = None
    while True:
        entries = await read_after(redis, gen_id, after, page)
        for entry_id, fields in entries:
            event = ev.decode_entry(entry_id, fields)
            if event.type == ev.DELTA:
                parts.append(event.data.get("content") or "")
            elif event.type == ev.STATUS and event.data.get("status") == ev.RUNNING:
                parts.clear()  # an attempt starts over
        if len(entries) < page:
            return "".join(parts)
        after = event.id
