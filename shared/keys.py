"""Every Redis key tokenrelay uses, built in one place.

Per-generation keys share the hash tag ``{gen_id}`` so that one generation's
keys live in one Redis Cluster slot and a Lua script may touch them all.
"""

from __future__ import annotations

PREFIX = "tr"

# Pending generations keep their keys this long at most before a terminal event
# sets the real retention; generous, so a quiet long generation never expires mid-run.
PENDING_TTL_S = 7 * 24 * 3600


def events(gen_id: str) -> str:
    """The Redis Stream of a generation's events (the SSE wire, one entry per event)."""
    return f"{PREFIX}:{{{gen_id}}}:events"


def meta(gen_id: str) -> str:
    """Hash with the generation's status, model, tenant, timestamps and request."""
    return f"{PREFIX}:{{{gen_id}}}:meta"


def content(gen_id: str) -> str:
    """String with all text so far, so status reads are O(1) instead of a stream scan."""
    return f"{PREFIX}:{{{gen_id}}}:content"


def cancel(gen_id: str) -> str:
    """Flag set by the API when a cancel is requested; the worker polls it as a fallback."""
    return f"{PREFIX}:{{{gen_id}}}:cancel"


def viewers(gen_id: str) -> str:
    """Hash of a generation's presence: per API process its viewer count and when that
    count expires, and when a viewer was last seen (shared/presence.py)."""
    return f"{PREFIX}:{{{gen_id}}}:viewers"


def idempotency(tenant: str, key: str) -> str:
    """Maps a tenant's Idempotency-Key to the generation it created."""
    return f"{PREFIX}:idem:{{{tenant}}}:{key}"


def hub_wake(node_id: str) -> str:
    """Private stream an API process's hub includes in its XREAD, so new streams interrupt it."""
    return f"{PREFIX}:hub:{{{node_id}}}:wake"


def hub_slot_wake(tag: str, node_id: str) -> str:
    """On a Cluster, an API process's wake stream for one slot: ``tag`` (a generation id in
    that slot) puts it in the slot its XREAD reads, which a multi-key read requires."""
    return f"{PREFIX}:hub:{{{tag}}}:wake:{node_id}"


# Pub/sub channel: published after each enqueue so idle workers poll at once
# instead of waiting for arq's poll_delay.
WAKE_CHANNEL = f"{PREFIX}:wake"

# Pub/sub channel: a generation id published when a cancel is requested.
CANCEL_CHANNEL = f"{PREFIX}:cancel"

# Shared signing secret used when TOKENRELAY_SIGNING_SECRET is unset (dev setups),
# so every API process of one deployment signs alike.
SIGNING_SECRET = f"{PREFIX}:signing-secret"


def usage(tenant: str) -> str:
    """Hash of a tenant's running totals: tokens, and generations by final status."""
    return f"{PREFIX}:usage:{{{tenant}}}"


def usage_counted(tenant: str, gen_id: str) -> str:
    """Marker that a generation is in its tenant's totals, so a re-run never counts it twice."""
    return f"{PREFIX}:usage:{{{tenant}}}:counted:{gen_id}"


# Hash gen_id -> "<worker id> <attempt>" of every generation a worker is running;
# the reaper compares it with the workers' liveness keys to find lost generations.
RUNNING = f"{PREFIX}:running"

# Held for one reaper pass, so several workers don't re-enqueue the same generation.
REAPER_LOCK = f"{PREFIX}:reaper-lock"


def worker_alive(worker_id: str) -> str:
    """Liveness key of a worker process, renewed every second with a short TTL."""
    return f"{PREFIX}:worker:{{{worker_id}}}:alive"


def tenant_active(tenant: str) -> str:
    """Sorted set of a tenant's queued and running generations (score: when to give up on one)."""
    return f"{PREFIX}:active:{{{tenant}}}"

# Hash of deployment-wide generation statistics (shared/stats.py), read by /metrics.
STATS = f"{PREFIX}:stats"


def thread_meta(thread_id: str) -> str:
    """Hash of a thread: tenant, system prompt, model, metadata, title, the active
    generation, token totals, and the retention and context budget its last message set."""
    return f"{PREFIX}:{{{thread_id}}}:meta"


def thread_turns(thread_id: str) -> str:
    """List of a thread's user messages in order, each naming the generation that answers it."""
    return f"{PREFIX}:{{{thread_id}}}:turns"


def thread_replies(thread_id: str) -> str:
    """Hash generation id -> the assistant message it left when it ended ('' until then):
    the thread's generations, so no other generation can write into it."""
    return f"{PREFIX}:{{{thread_id}}}:replies"


def thread_pending(thread_id: str) -> str:
    """List of a thread's enqueued generations, started one by one as the active one ends."""
    return f"{PREFIX}:{{{thread_id}}}:pending"


def thread_keys(thread_id: str) -> list[str]:
    """Every key of a thread (one hash tag: one Cluster slot, one Lua script may touch all)."""
    return [thread_meta(thread_id), thread_turns(thread_id), thread_replies(thread_id),
            thread_pending(thread_id)]


def tenant_threads(tenant: str) -> str:
    """Sorted set of a tenant's threads by last activity; entries of expired threads are
    pruned when a listing meets them."""
    return f"{PREFIX}:threads:{{{tenant}}}"
