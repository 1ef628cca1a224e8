"""The generation job: provider → stream writer → exactly one terminal event.

Safe to run again (arq may run a job more than once): ``streams.start`` fences
each attempt, and a newer attempt makes every write of an older one a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, limits, stats, streams
from tokenrelay.shared.errors import ProviderError
from tokenrelay.shared.redis import awaited
from tokenrelay.shared.settings import Settings
from tokenrelay.shared.usage import record as count_usage
from tokenrelay.worker.control import Control
from tokenrelay.worker.lease import Lease, enqueue_attempt
from tokenrelay.worker.providers import Delta, Finish, GenerationRequest, Providers
from tokenrelay.worker.tasks import stop_task

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a worker keeps retrying an append while Redis is unreachable.
APPEND_RETRY_S = 60.0


class Fenced(Exception):
    """A newer attempt owns the stream, or it has ended: this attempt must stop writing."""


async def generate(ctx: dict[str, Any], gen_id: str, attempt: int = 1) -> str:
    """arq job: stream one attempt of a generation into its Redis Stream.

    Returns the terminal event type, or why the attempt did not run. ``attempt``
    is 1 for the API's job; the reaper and a shutting-down worker queue the next.
    """
    redis: Redis = ctx["tr_redis"]
    settings: Settings = ctx["settings"]
    control: Control = ctx["control"]
    lease: Lease = ctx["lease"]

    cancel_event = control.watch(gen_id)
    run = secrets.token_hex(8)
    try:
        # Everything before the first token is retried through a short Redis outage:
        # a job that failed here would leave its generation running with no worker.
        started, why = await retrying(lambda: streams.start(redis, gen_id, attempt, run), gen_id)
        if not started:
            logger.info("not started (%s) generation_id=%s attempt=%d", why, gen_id, attempt)
            if why in ev.TERMINAL_STATUSES:
                # Ended without us (cancelled while queued), or counted by nobody yet
                # (a worker lost right after the terminal write): count it, once.
                await count_usage(redis, gen_id, settings.retention_s)
                await limits.release_generation(redis, gen_id)
            return why
        logger.info("started generation_id=%s attempt=%d", gen_id, attempt)
        # Side by side: one round trip of latency before the first token, not three.
        _, cancel_requested, meta = await retrying(lambda: asyncio.gather(
            lease.hold(gen_id, attempt),
            redis.exists(keys.cancel(gen_id)),
            awaited(redis.hmget(keys.meta(gen_id), ["request", "created_at", "started_at"])),
        ), gen_id)
        if cancel_requested:
            cancel_event.set()
        try:
            outcome = await _run(ctx, gen_id, attempt, cancel_event, meta)
        except asyncio.CancelledError:
            # The worker is shutting down (not a user's cancel, which is an event):
            # hand the generation over to another worker at once.
            logger.warning("handing over generation_id=%s attempt=%d", gen_id, attempt)
            await asyncio.shield(enqueue_attempt(ctx["redis"], redis, gen_id, attempt + 1))
            raise
        await lease.release(gen_id, attempt)
        logger.info("finished %s generation_id=%s", outcome, gen_id)
        return outcome
    finally:
        control.unwatch(gen_id, cancel_event)


async def _run(ctx: dict[str, Any], gen_id: str, attempt: int, cancel: asyncio.Event,
               meta: list[Any]) -> str:
    """``meta``: the generation's request, created_at and started_at (read with the start)."""
    redis: Redis = ctx["tr_redis"]
    settings: Settings = ctx["settings"]
    providers: Providers = ctx["providers"]

    async def finish_and_count(event_type: str, data: dict[str, Any], fields: dict[str, str]
                               ) -> None:
        if await retrying(lambda: streams.finish(
            redis, gen_id, attempt, event_type, data, settings.retention_s, fields
        ), gen_id):
            await count_usage(redis, gen_id, settings.retention_s)
            await limits.release_generation(redis, gen_id)
            await _record_stats(redis, event_type, data, timing)

    async def terminal(event_type: str, data: dict[str, Any], **fields: str) -> str:
        # Shielded: a job cancelled mid-write still leaves exactly one terminal event,
        # counted in the tenant's usage once.
        await asyncio.shield(finish_and_count(event_type, data, fields))
        return event_type

    raw_request, created_at, started_at = meta
    if raw_request is None:
        return "missing"
    body = json.loads(raw_request)
    timing = _Timing(float(created_at or 0), float(started_at or 0))
    try:
        provider, name = providers.resolve(body["model"])
    except ProviderError as exc:
        return await terminal(ev.ERROR, _error_data(exc), error=json.dumps(_error_data(exc)))
    request = GenerationRequest(
        model=name,
        messages=body["messages"],
        max_tokens=body.get("max_tokens"),
        temperature=body.get("temperature"),
        extra=body.get("extra") or {},
    )

    async def pump() -> Finish:
        finish: Finish | None = None
        seq = 0
        async for chunk in provider.stream(request):
            if isinstance(chunk, Delta):
                data = chunk.as_event()
                if data:
                    seq += 1
                    if not await append_with_retry(redis, gen_id, attempt, data, seq):
                        raise Fenced()
                    if seq == 1:
                        timing.first_delta = time.time()
            else:
                finish = chunk
        if finish is None:
            raise ProviderError("provider ended without a finish")
        return finish

    pump_task = asyncio.create_task(pump(), name=f"pump-{gen_id}")
    cancel_task = asyncio.create_task(cancel.wait(), name=f"cancel-{gen_id}")
    try:
        done, _ = await asyncio.wait(
            {pump_task, cancel_task},
            timeout=settings.max_generation_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        cancel_task.cancel()
        await stop_task(pump_task)  # closes the upstream connection

    if pump_task in done and not pump_task.cancelled():
        failure = pump_task.exception()
        if failure is None:
            finish = pump_task.result()
            usage = finish.usage or {}
            return await terminal(
                ev.DONE,
                {"finish_reason": finish.finish_reason, "usage": finish.usage},
                finish_reason=finish.finish_reason,
                usage=json.dumps(usage),
            )
        if isinstance(failure, Fenced):
            logger.info("fenced: a newer attempt owns generation_id=%s", gen_id)
            return "fenced"
        if isinstance(failure, ProviderError):
            logger.warning("provider error generation_id=%s: %s", gen_id, failure)
            data = _error_data(failure)
        else:
            logger.error("generation failed generation_id=%s", gen_id, exc_info=failure)
            data = {"code": "internal_error", "message": "the generation failed", "retryable": True}
        return await terminal(ev.ERROR, data, error=json.dumps(data))
    if cancel_task in done or cancel.is_set():
        return await terminal(ev.CANCELLED, {})
    data = {
        "code": "timeout",
        "message": f"generation exceeded {settings.max_generation_s:g}s",
        "retryable": False,
    }
    return await terminal(ev.ERROR, data, error=json.dumps(data))


@dataclass
class _Timing:
    created: float
    started: float
    first_delta: float | None = None


async def _record_stats(
    redis: Redis, event_type: str, data: dict[str, Any], timing: _Timing
) -> None:
    now = time.time()
    completion = ((data.get("usage") or {}).get("completion_tokens")
                  if event_type == ev.DONE else None)
    streamed_s = now - timing.first_delta if timing.first_delta else 0.0
    try:
        await stats.record(
            redis,
            ev.STATUS_AFTER[event_type],
            error_code=data.get("code") if event_type == ev.ERROR else None,
            queue_wait_s=timing.started - timing.created if timing.started else None,
            ttft_s=timing.first_delta - timing.created if timing.first_delta else None,
            tokens_per_s=completion / streamed_s if completion and streamed_s > 0 else None,
        )
    except (RedisError, OSError) as exc:  # statistics must never fail a generation
        logger.warning("could not record statistics: %s", exc)


async def append_with_retry(
    redis: Redis, gen_id: str, attempt: int, data: dict[str, Any], seq: int
) -> bool:
    """Append one delta, riding out a Redis outage.

    Deltas are appended one at a time, in order, and a retried append with the
    same ``seq`` is applied once, so an outage neither loses nor reorders nor
    duplicates what this worker holds.
    """
    return await retrying(
        lambda: streams.append_delta(redis, gen_id, attempt, data, seq), gen_id
    )


async def retrying(call: Callable[[], Awaitable[T]], gen_id: str) -> T:
    """Run ``call``, retrying with backoff while Redis is unreachable (up to APPEND_RETRY_S)."""
    delay = 0.05
    deadline = asyncio.get_running_loop().time() + APPEND_RETRY_S
    while True:
        try:
            return await call()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            logger.warning("redis write failed (%s); retrying generation_id=%s", exc, gen_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _error_data(exc: ProviderError) -> dict[str, Any]:
    return exc.as_event()
