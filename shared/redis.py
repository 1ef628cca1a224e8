"""Redis plumbing: client factories, replies as text, Lua scripts, riding out an outage.

One place sets client names, timeouts and retries (``create_redis``); every Lua
script runs through ``Script``; every loop that waits for Redis to come back
sleeps with ``Backoff``; a write that must not be lost goes through ``retrying``.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What "Redis is unreachable for now" looks like: worth waiting out, unlike a script error.
OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# How long a worker keeps retrying a write while Redis is unreachable.
OUTAGE_RETRY_S = 60.0


def create_redis(url: str, process_name: str, *, max_connections: int = 200,
                 cluster: bool = False, patient: bool = False) -> Redis:
    """A pooled client for ordinary commands: short timeouts, a few retries.

    With ``cluster``, a Redis Cluster client (``url`` names any node). It offers the
    same command methods tokenrelay uses on its keys (one generation's keys share a
    slot); it has no pub/sub and no MULTI, which live on the queue's Redis instead.

    ``patient`` (workers): retry a command for about 10 s instead of 0.1 s while Redis
    is unreachable, so a restart of Redis does not fail a job between its start and
    its first token, where nothing else would end the generation. An API answers 503
    at once instead, and the client retries.
    """
    retry = (Retry(ExponentialBackoff(cap=1.0, base=0.05), 14) if patient
             else Retry(ExponentialBackoff(cap=0.5, base=0.01), 3))
    if cluster:
        return cast(Redis, RedisCluster.from_url(
            url,
            client_name=f"tokenrelay-{process_name}",
            socket_timeout=5,
            socket_connect_timeout=5,
            retry=retry,
            max_connections=max_connections,
        ))
    client: Redis = Redis.from_url(
        url,
        client_name=f"tokenrelay-{process_name}",
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=max_connections,
    )
    return client


def create_blocking_redis(url: str, process_name: str, block_s: float) -> Redis:
    """A single-connection client for blocking reads: socket timeout above the block, no retry.

    redis-py's default socket timeout would cut long blocking XREADs, and a retry
    would silently re-issue a read whose cursor the caller owns.
    """
    client: Redis = Redis.from_url(
        url,
        client_name=f"tokenrelay-{process_name}",
        socket_timeout=block_s + 5,
        socket_connect_timeout=5,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
    )
    return client


async def awaited(result: Awaitable[T] | T) -> T:
    """Await a redis-py asyncio command result.

    redis-py types its commands as ``Awaitable[T] | T`` (one signature for the sync
    and asyncio clients); on the asyncio client they are always awaitable.
    """
    return await result if inspect.isawaitable(result) else result


def text(value: bytes | str | Any) -> str:
    """A reply as ``str``: clients made without ``decode_responses`` answer bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def lua_set(values: Iterable[str]) -> str:
    """A Lua table literal to test membership with (``if SET[x] then``), so a script
    shares its list of names with the Python definition instead of repeating it."""
    return "{" + ", ".join(f"[{json.dumps(v)}]=true" for v in sorted(values)) + "}"


class Script:
    """A Lua script: sent in full the first time, then run by its SHA1 (EVALSHA).

    A server that does not know it (another server, a restart, SCRIPT FLUSH) gets
    the body again in the same call, so no call costs an extra round trip but the
    first on a new server.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._sent = False

    async def __call__(self, redis: Redis, keys: Sequence[str], *args: Any) -> Any:
        if self._sent:
            try:
                return await awaited(redis.evalsha(self.sha, len(keys), *keys, *args))
            except NoScriptError:
                pass
        self._sent = True  # EVAL also caches the script on the server
        return await awaited(redis.eval(self.source, len(keys), *keys, *args))

    async def many(self, redis: Redis,
                   calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run the script once per (keys, args) in one pipeline (one round trip per node on
        a Cluster), in order; the replies in order. A server that does not know the script
        gets its body for those calls only. Raises the first other error."""
        if not calls:
            return []
        replies: list[Any] = []
        if not self._sent:  # the first call sends the body; the others run by its SHA
            first_keys, first_args = calls[0]
            replies.append(await self(redis, first_keys, *first_args))
            calls = calls[1:]
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                # (by name: redis-py blocks the evalsha method on Cluster pipelines, but
                # routes the command by its keys like any other)
                pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            piped: list[Any] = await pipe.execute(raise_on_error=False) if calls else []
        for index, reply in enumerate(piped):
            if isinstance(reply, NoScriptError):
                keys, args = calls[index]
                piped[index] = await awaited(redis.eval(self.source, len(keys), *keys, *args))
        replies += piped
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


class Backoff:
    """Delays between attempts while Redis is away: ``first``, doubling up to ``cap``."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def reset(self) -> None:
        """Redis answered: the next outage starts from the first delay again."""
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)


async def retrying(call: Callable[[], Awaitable[T]], gen_id: str,
                   within_s: float = OUTAGE_RETRY_S) -> T:
    """Run ``call``, again with backoff while Redis is unreachable, for up to ``within_s``.

    Only for calls that are safe to repeat (fenced or idempotent writes, reads).
    """
    try:
        return await call()  # the usual case, without the set-up below
    except OUTAGE_ERRORS as exc:
        if within_s <= 0:
            raise
        failure = exc
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    backoff = Backoff(0.05, 1.0)
    while True:
        logger.warning("redis write failed (%s); retrying generation_id=%s", failure, gen_id)
        await backoff.sleep()
        try:
            return await call()
        except OUTAGE_ERRORS as exc:
            if loop.time() >= deadline:
                raise
            failure = exc
