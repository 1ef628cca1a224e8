"""A tenant's threads by last activity: the sorted set behind ``GET /v1/threads``.

Threads expire by themselves; their index entries are dropped when a listing
meets them, and the index expires with the tenant's last active thread.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from redis.asyncio import Redis

from tokenrelay.shared import keys
from tokenrelay.shared.redis import text


async def touch(redis: Redis, tenant: str, thread_id: str, at: float, ttl: int) -> None:
    """Put the thread first (``at``: its last activity); the index outlives its last thread."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.tenant_threads(tenant), {thread_id: at})
        pipe.expire(keys.tenant_threads(tenant), ttl)
        await pipe.execute()


def encode_cursor(score: float, thread_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}|{thread_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """(score, thread id) of a listing cursor; ValueError if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, thread_id = raw.split("|")
        if not thread_id.startswith("thr_"):
            raise ValueError(thread_id)
        return float(score), thread_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("malformed cursor") from exc


async def page(
    redis: Redis, tenant: str, limit: int, cursor: str | None = None
) -> tuple[list[tuple[str, dict[Any, Any], int]], str | None]:
    """Up to ``limit`` of the tenant's threads, newest activity first, as (id, raw meta
    hash, number of turns), and the cursor of the next page (None on the last)."""
    index = keys.tenant_threads(tenant)
    after = decode_cursor(cursor) if cursor else None
    found: list[tuple[str, dict[Any, Any], int, float]] = []
    expired: list[str] = []
    offset = 0
    while len(found) <= limit:
        entries = await redis.zrevrangebyscore(
            index, after[0] if after else "+inf", "-inf", start=offset, num=limit + 1,
            withscores=True)
        if not entries:
            break
        offset += len(entries)
        # Equal scores come in descending member order: skip what the cursor has passed.
        ids = [(text(m), s) for m, s in entries
               if after is None or s < after[0] or text(m) < after[1]]
        async with redis.pipeline(transaction=False) as pipe:
            for thread_id, _ in ids:
                pipe.hgetall(keys.thread_meta(thread_id))
                pipe.llen(keys.thread_turns(thread_id))
            replies = await pipe.execute()
        for (thread_id, score), meta, turns in zip(ids, replies[::2], replies[1::2],
                                                   strict=True):
            if meta:
                found.append((thread_id, meta, int(turns), score))
            else:
                expired.append(thread_id)
    if expired:
        await redis.zrem(index, *expired)
    more = len(found) > limit
    found = found[:limit]
    next_cursor = encode_cursor(found[-1][3], found[-1][0]) if more and found else None
    return [(thread_id, meta, turns) for thread_id, meta, turns, _ in found], next_cursor



async def remove(redis: Redis, tenant: str, thread_id: str) -> None:
    await redis.zrem(keys.tenant_threads(tenant), thread_id)
