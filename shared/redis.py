"""Redis client factories: one place that sets names, timeouts and retries."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

T = TypeVar("T")


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
