"""The Lua scripts of threads (each a ``shared.redis.Script``).

Each script touches the keys of one thread only (``keys.thread_keys``: one hash
tag, one Cluster slot), so each is one atomic step on a plain Redis and on a
Cluster alike. Every script that writes refreshes the TTL of every key of the
thread, which is what makes a thread's retention slide with its activity.
"""

from __future__ import annotations

from tokenrelay.shared.redis import Script

_EXPIRE_ALL = "for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], {ttl}) end"

# KEYS: meta ; ARGV: ttl field value ... Returns 0 (and changes nothing) if it exists.
CREATE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")

# The active-slot claim; the turn's generation gets an empty reply (answer pending).
# KEYS: meta turns replies pending ;
# ARGV: tenant if_busy gen_id turn_json now ttl title budget
# Returns {outcome, active, dropped...}: outcome start | queued | interrupt | busy | missing;
# ``dropped`` (interrupt) are the enqueued generations this message replaces.
CLAIM = Script(f"""
local m = redis.call('HMGET', KEYS[1], 'tenant', 'active')
if m[1] ~= ARGV[1] then return {{'missing', ''}} end
local active = m[2] or ''
local outcome = 'start'
local dropped = {{}}
if active ~= '' then
  if ARGV[2] == 'reject' then return {{'busy', active}} end
  outcome = 'queued'
  if ARGV[2] == 'interrupt' then
    outcome = 'interrupt'
    dropped = redis.call('LRANGE', KEYS[4], 0, -1)
    redis.call('DEL', KEYS[4])
  end
  redis.call('RPUSH', KEYS[4], ARGV[3])
else
  redis.call('HSET', KEYS[1], 'active', ARGV[3], 'started', '')
end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[3], '')
redis.call('HSETNX', KEYS[1], 'title', ARGV[7])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[5], 'ttl', ARGV[6], 'budget', ARGV[8])
{_EXPIRE_ALL.format(ttl="ARGV[6]")}
return {{outcome, active, unpack(dropped)}}
""")

# Record an ended generation's reply; if it held the slot, pass the slot on. Only a
# generation a claim put in the thread (its empty reply) is recorded: a metadata
# ``thread_id`` alone does not make a generation part of a thread.
# KEYS: meta turns replies pending ;
# ARGV: gen_id reply_json now prompt completion total cost_units('': unpriced)
# Returns {'gone'} (no such thread, or not its generation) | {'recorded', next, tenant, ttl}
# | {'again', active, tenant, ttl, started} (recorded before).
END = Script(f"""
local m = redis.call('HMGET', KEYS[1], 'tenant', 'active', 'ttl', 'started')
if not m[1] then return {{'gone'}} end
local r = redis.call('HGET', KEYS[3], ARGV[1])
if not r then return {{'gone'}} end
if r ~= '' then return {{'again', m[2] or '', m[1], m[3], m[4] or ''}} end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'prompt_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'completion_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'total_tokens', ARGV[6])
if ARGV[7] ~= '' then redis.call('HINCRBY', KEYS[1], 'cost_units', ARGV[7]) end
local nxt = ''
if m[2] == ARGV[1] then
  nxt = redis.call('LPOP', KEYS[4]) or ''
  redis.call('HSET', KEYS[1], 'active', nxt, 'started', '')
else
  redis.call('LREM', KEYS[4], 0, ARGV[1])
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
{_EXPIRE_ALL.format(ttl="m[3]")}
return {{'recorded', nxt, m[1], m[3]}}
""")

# The active generation's job is on the queue (a retried end hook need not start it).
# KEYS: meta ; ARGV: gen_id
STARTED = Script("""
if redis.call('HGET', KEYS[1], 'active') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'started', ARGV[1])
return 1
""")

# KEYS: meta turns replies pending ; ARGV: tenant
# Returns {} if missing, else the generations to cancel (active first, then enqueued).
DELETE = Script("""
local m = redis.call('HMGET', KEYS[1], 'tenant', 'active')
if m[1] ~= ARGV[1] then return false end
local out = redis.call('LRANGE', KEYS[4], 0, -1)
if m[2] and m[2] ~= '' then table.insert(out, 1, m[2]) end
redis.call('DEL', unpack(KEYS))
return out
""")

# An HSET that never re-creates an expired key (which would then have no TTL).
# KEYS: hash ; ARGV: field value ...
SET_IF_EXISTS = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
""")

