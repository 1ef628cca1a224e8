"""The generation job: provider → stream writer → exactly one terminal event.

Safe to run again (arq may run a job more than once): ``streams.start`` fences
each attempt, and a newer attempt makes every write of an older one a no-op.
One attempt is three steps: decode the stored request, pump the provider's
deltas into the stream (racing a cancel and the time limit), and turn how the
pump ended into the generation's ``Ending``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from tokenrelay.shared import costs, keys, lifecycle, models, queue, streams
from tokenrelay.shared import events as ev
from tokenrelay.shared.errors import ProviderError
from tokenrelay.shared.lifecycle import Ending, Timing
from tokenrelay.shared.redis import awaited, retrying
from tokenrelay.worker.context import WorkerContext
from tokenrelay.worker.providers import Delta, Finish, GenerationRequest, Provider, Providers
from tokenrelay.worker.providers.base import estimate_usage
from tokenrelay.worker.tasks import stop_task
from tokenrelay.worker.writer import MAX_BACKLOG, Fenced, Slot

logger = logging.getLogger(__name__)


async def generate(ctx: dict[str, Any], gen_id: str, attempt: int = 1) -> str:
    """arq job: stream one attempt of a generation into its Redis Stream.

    Returns the terminal event type, or why the attempt did not run. ``attempt``
    is 1 for the API's job; the reaper and a shutting-down worker queue the next.
    """
    return await run_attempt(WorkerContext.of(ctx), gen_id, attempt)


async def run_attempt(wc: WorkerContext, gen_id: str, attempt: int) -> str:
    """Start the attempt (fenced), run it, and hand it over if the worker stops meanwhile."""
    redis = wc.redis
    cancel_event = wc.control.watch(gen_id)
    run = secrets.token_hex(8)
    try:
        # Everything before the first token is retried through a short Redis outage:
        # a job that failed here would leave its generation running with no worker.
        started, base = await retrying(lambda: streams.start(redis, gen_id, attempt, run), gen_id)
        if not started:
            why = base  # not started: why not
            logger.info("not started (%s) generation_id=%s attempt=%d", why, gen_id, attempt)
            if why in ev.TERMINAL_STATUSES:
                # Ended without us (cancelled while queued), or settled by nobody yet
                # (a worker lost right after the terminal write): settle it, once.
                await wc.lifecycle.settle(gen_id)
            return why
        logger.info("started generation_id=%s attempt=%d", gen_id, attempt)
        # Side by side: one round trip of latency before the first token, not three.
        _, cancel_requested, meta = await retrying(lambda: asyncio.gather(
            wc.lease.hold(gen_id, attempt),
            redis.exists(keys.cancel(gen_id)),
            awaited(redis.hmget(keys.meta(gen_id), ["request", "created_at", "started_at"])),
        ), gen_id)
        if cancel_requested:
            cancel_event.set()
        try:
            outcome = await _run(wc, gen_id, attempt, base, cancel_event, meta)
        except asyncio.CancelledError:
            # The worker is shutting down (not a user's cancel, which is an event):
            # hand the generation over to another worker at once.
            logger.warning("handing over generation_id=%s attempt=%d", gen_id, attempt)
            await asyncio.shield(queue.enqueue_attempt(wc.queue, gen_id, attempt + 1))
            raise
        await wc.lease.release(gen_id, attempt)
        logger.info("finished %s generation_id=%s", outcome, gen_id)
        return outcome
    finally:
        wc.control.unwatch(gen_id, cancel_event)


@dataclass(slots=True)
class _Produced:
    """What the attempt has streamed so far, and from which model: the usage of an answer
    cut short (cancelled, timed out, failed after its first token)."""

    model: str = ""
    chars: int = 0


@dataclass(frozen=True, slots=True)
class _Decoded:
    """A stored request, ready to stream: the provider and model name of each candidate
    (one, or the fallbacks in order)."""

    candidates: list[tuple[Provider, str]]
    models: list[str]  # each candidate's model as the request names it (PRICES' keys)
    request: GenerationRequest
    timing: Timing
    abandon: bool  # on_disconnect: cancel once no viewer has been connected for the grace
    produced: _Produced = field(default_factory=_Produced)


async def _run(wc: WorkerContext, gen_id: str, attempt: int, base: str,
               cancel: asyncio.Event, meta: list[Any]) -> str:
    """``meta``: the generation's request, created_at and started_at (read with the start);
    ``base``: the attempt's ``running`` entry id."""
    decoded = _decode(wc.providers, meta)
    if decoded is None:
        return "missing"
    slot = Slot(gen_id, base)
    try:
        if isinstance(decoded, Ending):
            ending: Ending | None = decoded
            timing = None
        else:
            timing = decoded.timing
            ending = await _stream(wc, slot, decoded, cancel)
            if ending is not None and not await _written(wc, slot):
                ending = None
        if ending is None:
            return "fenced"
        await wc.lifecycle.end(gen_id, attempt, ending, timing, slot.content)
        return ending.event_type
    finally:
        wc.writer.discard(slot)


async def _written(wc: WorkerContext, slot: Slot) -> bool:
    """Wait for the deltas a stopped pump left with the writer (they go before the
    terminal event); False if the attempt was fenced meanwhile."""
    try:
        await wc.writer.drain(slot)
    except Fenced:
        return False
    except Exception:  # noqa: BLE001 - Redis stayed away: the terminal write retries too
        logger.warning("deltas not written generation_id=%s", slot.gen_id, exc_info=True)
    return True


async def _stream(wc: WorkerContext, slot: Slot, decoded: _Decoded,
                  cancel: asyncio.Event) -> Ending | None:
    """Pump the provider under the cancel, the time limit and, with ``on_disconnect:
    cancel``, the watch for a generation nobody watches any more."""
    gen_id = slot.gen_id
    if decoded.abandon:
        wc.control.watch_presence(gen_id)
    try:
        ending = await _race(_pump(wc, slot, decoded), cancel,
                             wc.settings.max_generation_s, gen_id)
        if (ending is not None and ending.event_type == ev.CANCELLED
                and gen_id in wc.control.abandoned):
            ending = lifecycle.cancelled(reason="abandoned")
        return None if ending is None else _cut_short_usage(wc, decoded, ending)
    finally:
        if decoded.abandon:
            wc.control.unwatch_presence(gen_id)


def _cut_short_usage(wc: WorkerContext, decoded: _Decoded, ending: Ending) -> Ending:
    """An answer cut short after its first token was still billed by the upstream for what
    it produced: its usage is estimated (characters / 4, marked ``estimated``) and priced,
    into the status and the tenant's and thread's totals. The terminal event is unchanged."""
    produced = decoded.produced
    if ending.event_type == ev.DONE or not produced.chars:
        return ending
    usage_ = costs.priced(wc.settings.prices, produced.model,
                          estimate_usage(decoded.request.messages, produced.chars))
    return replace(ending, fields={**ending.fields, "usage": json.dumps(usage_)})


def _decode(providers: Providers, meta: list[Any]) -> _Decoded | Ending | None:
    """The provider and request stored at creation; an ``error`` ending for a model no
    provider here serves; None when the generation has expired."""
    raw_request, created_at, started_at = meta
    if raw_request is None:
        return None
    body = json.loads(raw_request)
    names = models.candidates(body["model"])
    try:
        candidates = [providers.resolve(model) for model in names]
    except ProviderError as exc:
        return _provider_failure(exc)
    request = GenerationRequest(
        model=candidates[0][1],
        messages=body["messages"],
        max_tokens=body.get("max_tokens"),
        temperature=body.get("temperature"),
        extra=body.get("extra") or {},
    )
    return _Decoded(candidates, names, request,
                    Timing(float(created_at or 0), float(started_at or 0)),
                    abandon=body.get("on_disconnect") == "cancel")


async def _pump(wc: WorkerContext, slot: Slot, decoded: _Decoded) -> Finish:
    """Append the deltas of the first candidate that answers, in order; its ``Finish``,
    its usage priced (PRICES) for the model that answered.

    A candidate that fails retryably before its first delta hands over to the next
    (fallbacks); after a delta, or on the last candidate, the failure is the outcome.
    """
    last = len(decoded.candidates) - 1
    for index, (provider, name) in enumerate(decoded.candidates):
        request = replace(decoded.request, model=name)
        try:
            decoded.produced.model = decoded.models[index]
            finish = await _pump_one(wc, slot, provider, request, decoded.timing,
                                     decoded.produced)
        except ProviderError as exc:
            if index == last or not exc.retryable or decoded.timing.first_delta:
                raise
            logger.warning("model %s failed before its first token (%s); falling back to %s "
                           "generation_id=%s", json.dumps(name), exc.code,
                           json.dumps(decoded.candidates[index + 1][1]), slot.gen_id)
        else:
            return replace(finish, usage=costs.priced(wc.settings.prices, decoded.models[index],
                                                      finish.usage))
    raise AssertionError("unreachable: the last candidate returns or raises")


async def _pump_one(wc: WorkerContext, slot: Slot, provider: Provider,
                    request: GenerationRequest, timing: Timing, produced: _Produced) -> Finish:
    """Hand one provider's deltas to the writer in order; its ``Finish`` once they are all
    written. Raises ``Fenced`` as soon as this attempt may no longer write."""
    writer = wc.writer
    finish: Finish | None = None
    async for chunk in provider.stream(request):
        if isinstance(chunk, Delta):
            data = chunk.as_event()
            if data:
                writer.append(slot, data)
                produced.chars += chunk.size()
                if timing.first_delta is None:
                    timing.first_delta = time.time()
                if len(slot.pending) >= MAX_BACKLOG:  # Redis is slow or away: wait for it
                    await writer.drain(slot)
        else:
            finish = chunk
    if finish is None:
        raise ProviderError("provider ended without a finish")
    await writer.drain(slot)
    return finish


async def _race(pump: Coroutine[Any, Any, Finish], cancel: asyncio.Event, limit_s: float,
                gen_id: str) -> Ending | None:
    """Run ``pump`` until it ends, a cancel is requested or ``limit_s`` passes; the
    provider's stream is closed whichever comes first. None when fenced."""
    pump_task: asyncio.Task[Finish] = asyncio.create_task(pump, name=f"pump-{gen_id}")
    cancel_task = asyncio.create_task(cancel.wait(), name=f"cancel-{gen_id}")
    try:
        done, _ = await asyncio.wait(
            {pump_task, cancel_task}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        cancel_task.cancel()
        await stop_task(pump_task)  # closes the upstream connection
    if pump_task in done and not pump_task.cancelled():
        return _outcome(pump_task, gen_id)
    if cancel_task in done or cancel.is_set():
        return lifecycle.cancelled()
    return lifecycle.failed("timeout", f"generation exceeded {limit_s:g}s", retryable=False)


def _outcome(pump_task: asyncio.Task[Finish], gen_id: str) -> Ending | None:
    """How a pump that ran to its end ends the generation; None when fenced."""
    failure = pump_task.exception()
    if failure is None:
        finish = pump_task.result()
        return lifecycle.done(finish.finish_reason, finish.usage)
    if isinstance(failure, Fenced):
        logger.info("fenced: a newer attempt owns generation_id=%s", gen_id)
        return None
    if isinstance(failure, ProviderError):
        logger.warning("provider error generation_id=%s: %s", gen_id, failure)
        return _provider_failure(failure)
    logger.error("generation failed generation_id=%s", gen_id, exc_info=failure)
    return lifecycle.failed("internal_error", "the generation failed", retryable=True)


def _provider_failure(exc: ProviderError) -> Ending:
    """The client sees the provider's sanitized message; the log has the upstream's text."""
    data = exc.as_event()
    return lifecycle.failed(data.pop("code"), data.pop("message"),
                            retryable=data.pop("retryable"), **data)
