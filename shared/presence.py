"""Presence: how many viewers a generation has across the deployment, and since when none.

One hash per generation (``keys.viewers``, in the generation's slot) holds, per API
process, ``"<count> <expires at ms>"`` and ``seen``, when a viewer was last known to
be connected::

    API process ──publish (every PRESENCE_REFRESH_S, and soon after a change)──▶ p:<process>
    status read ──count──▶ sum of the unexpired counts
    worker (on_disconnect: cancel) ──abandoned──▶ none live and ``seen`` older than the grace
                                                  → the cancel flag, as a cancel request sets it

A process that dies stops refreshing: its count expires after PRESENCE_TTL_S and no
longer counts. Every time is Redis's own clock (``TIME``), so the processes' clocks
never have to agree. Each API process writes once per generation per refresh, in one
pipeline, however many viewers it has and however often they come and go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from redis.asyncio import Redis

from tokenrelay.shared import keys
from tokenrelay.shared.redis import Script

# A presence hash outlives its last write by this much beyond the TTL and the grace, so a
# worker still finds ``seen`` when it checks; nothing refreshes it once all have left.
KEEP_SLACK_S = 60.0

# Lua shared by the scripts: ``now`` in ms, and ``live``, the sum of the unexpired
# counts (with ``prune``, expired ones are deleted on the way).
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function live_count(key, prune)
  local live = 0
  local h = redis.call('HGETALL', key)
  for i = 1, #h, 2 do
    if string.sub(h[i], 1, 2) == 'p:' then
      local n, e = string.match(h[i + 1], '^(%d+) (%d+)$')
      if n and tonumber(e) > now then
        live = live + tonumber(n)
      elseif prune then
        redis.call('HDEL', key, h[i])
      end
    end
  end
  return live
end
"""

# One process's count of one generation. A count of 0 removes its entry and stamps
# ``seen`` (its viewers just left); nothing is written for a generation that does not
# exist (an unknown id a viewer asked for) or that this process never reported.
# KEYS: viewers meta ; ARGV: process count ttl_ms keep_ms
_PUBLISH = Script(_LIVE + """
local field = 'p:' .. ARGV[1]
local n = tonumber(ARGV[2])
if n > 0 then
  if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
  redis.call('HSET', KEYS[1], field, string.format('%d %d', n, now + tonumber(ARGV[3])),
    'seen', now)
elseif redis.call('HDEL', KEYS[1], field) == 1 then
  redis.call('HSET', KEYS[1], 'seen', now)
else
  return 0
end
live_count(KEYS[1], true)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
""")

# KEYS: viewers
_COUNT = Script(_LIVE + "return live_count(KEYS[1], false)")

# Whether a generation has had no viewer for the grace; if so, sets its cancel flag.
# The first check of a generation nobody has watched yet starts the grace (``seen``).
# KEYS: viewers cancel ; ARGV: grace_ms keep_ms cancel_ttl_s
_ABANDONED = Script(_LIVE + """
local function keep() redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if live_count(KEYS[1], true) > 0 then keep() return 0 end
local seen = tonumber(redis.call('HGET', KEYS[1], 'seen') or '')
if not seen then
  redis.call('HSET', KEYS[1], 'seen', now)
  keep()
  return 0
end
if now - seen < tonumber(ARGV[1]) then keep() return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
return 1
""")


def lifetime_ms(ttl_s: float, grace_s: float) -> int:
    """How long a presence hash lives after its last write."""
    return int((max(ttl_s, grace_s) + KEEP_SLACK_S) * 1000)


async def publish(redis: Redis, process: str, counts: Mapping[str, int], ttl_s: float,
                  keep_ms: int) -> None:
    """Write this process's viewer count of each generation in ``counts`` (0: none left),
    valid for ``ttl_s``; one pipeline."""
    ttl_ms = int(ttl_s * 1000)
    await _PUBLISH.many(redis, [
        ([keys.viewers(gen_id), keys.meta(gen_id)], [process, count, ttl_ms, keep_ms])
        for gen_id, count in counts.items()
    ])


async def count(redis: Redis, gen_id: str) -> int:
    """Viewers of ``gen_id`` connected to any API process (as of their last refresh)."""
    return int(await _COUNT(redis, [keys.viewers(gen_id)]))


async def abandoned(redis: Redis, gen_ids: Sequence[str], grace_s: float,
                    keep_ms: int) -> list[str]:
    """Those of ``gen_ids`` that have had no viewer for ``grace_s``; their cancel flag is set
    (one pipeline)."""
    replies = await _ABANDONED.many(redis, [
        ([keys.viewers(gen_id), keys.cancel(gen_id)],
         [int(grace_s * 1000), keep_ms, keys.PENDING_TTL_S])
        for gen_id in gen_ids
    ])
    return [gen_id for gen_id, reply in zip(gen_ids, replies, strict=True) if int(reply)]
