"""The generation job: provider → stream writer → exactly one terminal event.

Safe to run again (arq may run a job more than once): ``streams.start`` fences
each attempt, and a newer attempt makes every write of an older one a no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from redis.asyncio import Redis

from shared import events as ev
from shared import keys, streams
from shared.errors import ProviderError
from shared.settings import Settings
from worker.control import Control
from worker.providers import Delta, Finish, GenerationRequest, Providers

logger = logging.getLogger(__name__)


class Fenced(Exception):
    """A newer attempt owns the stream, or it has ended: this attempt must stop writing."""


async def generate(ctx: dict[str, Any], gen_id: str) -> str:
    """arq job: stream one generation into its Redis Stream; returns the terminal event type."""
    redis: Redis = ctx["tr_redis"]
    settings: Settings = ctx["settings"]
    control: Control = ctx["control"]
    attempt: int = ctx["job_try"]

    cancel_event = control.watch(gen_id)
    try:
        started, why = await streams.start(redis, gen_id, attempt)
        if not started:
            logger.info("not started (%s) generation_id=%s attempt=%d", why, gen_id, attempt)
            return why
        logger.info("started generation_id=%s attempt=%d", gen_id, attempt)
        if await redis.exists(keys.cancel(gen_id)):
            cancel_event.set()
        outcome = await _run(ctx, gen_id, attempt, cancel_event)
        logger.info("finished %s generation_id=%s", outcome, gen_id)
        return outcome
    finally:
        control.unwatch(gen_id)


async def _run(ctx: dict[str, Any], gen_id: str, attempt: int, cancel: asyncio.Event) -> str:
    redis: Redis = ctx["tr_redis"]
    settings: Settings = ctx["settings"]
    providers: Providers = ctx["providers"]

    async def terminal(event_type: str, data: dict[str, Any], **fields: str) -> str:
        # Shielded: a job cancelled mid-write still leaves exactly one terminal event.
        await asyncio.shield(
            streams.finish(redis, gen_id, attempt, event_type, data, settings.retention_s, fields)
        )
        return event_type

    meta = await redis.hget(keys.meta(gen_id), "request")
    if meta is None:
        return "missing"
    body = json.loads(meta)
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
        async for chunk in provider.stream(request):
            if isinstance(chunk, Delta):
                data = chunk.as_event()
                if data and not await streams.append_delta(redis, gen_id, attempt, data):
                    raise Fenced()
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
        if not pump_task.done():
            pump_task.cancel()  # closes the upstream connection
            await asyncio.gather(pump_task, return_exceptions=True)

    if pump_task in done and not pump_task.cancelled():
        exc = pump_task.exception()
        if exc is None:
            finish = pump_task.result()
            usage = finish.usage or {}
            return await terminal(
                ev.DONE,
                {"finish_reason": finish.finish_reason, "usage": finish.usage},
                finish_reason=finish.finish_reason,
                usage=json.dumps(usage),
            )
        if isinstance(exc, Fenced):
            logger.info("fenced: a newer attempt owns generation_id=%s", gen_id)
            return "fenced"
        if isinstance(exc, ProviderError):
            logger.warning("provider error generation_id=%s: %s", gen_id, exc.message)
            data = _error_data(exc)
        else:
            logger.error("generation failed generation_id=%s", gen_id, exc_info=exc)
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


def _error_data(exc: ProviderError) -> dict[str, Any]:
    return {"code": exc.code, "message": exc.message, "retryable": exc.retryable}
