"""Generation use cases behind the routes: create, read status, stream, cancel."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import Response

from tokenrelay.api import idempotency
from tokenrelay.api.channel import SSE, Channel, View, Viewer
from tokenrelay.api.deps import AppState, Principal
from tokenrelay.api.schemas import ErrorInfo, GenerationCreate, GenerationCreated, GenerationStatus
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, lifecycle, limits, queue, streams
from tokenrelay.shared.errors import (
    BadRequest,
    Conflict,
    Gone,
    NotFound,
    TokenRelayError,
    TooManyRequests,
    Unavailable,
    ValidationFailed,
)
from tokenrelay.shared.ids import new_generation_id, past_retention
from tokenrelay.shared.models import check_model

logger = logging.getLogger(__name__)

# How long a generation may wait in the queue before its concurrency slot is
# given up on (the slot is normally released at its terminal event).
QUEUE_ALLOWANCE_S = 600


# The native create endpoint, as the Idempotency-Key's request fingerprint names it.
ENDPOINT = "POST /v1/generations"


def events_url(gen_id: str) -> str:
    return f"/v1/generations/{gen_id}/events"


async def create(
    state: AppState, tenant: str, body: GenerationCreate, idempotency_key: str | None,
    *, enqueue: bool = True, endpoint: str = ENDPOINT, gen_id: str | None = None,
    first_event: dict[str, Any] | None = None,
) -> GenerationCreated:
    """Record the generation (status and its first event), then enqueue it and wake a worker.

    ``enqueue=False`` (threads): record it queued but without its job, which the caller
    starts later with :func:`enqueue`. ``gen_id``: its id, chosen by the caller;
    ``first_event``: more data for its ``queued`` event (what a protocol's fold starts from).
    """
    created, _ = await create_or_replay(state, tenant, body, idempotency_key, enqueue=enqueue,
                                        endpoint=endpoint, gen_id=gen_id,
                                        first_event=first_event)
    return created


async def create_or_replay(
    state: AppState, tenant: str, body: GenerationCreate, idempotency_key: str | None,
    *, enqueue: bool = True, endpoint: str = ENDPOINT, gen_id: str | None = None,
    first_event: dict[str, Any] | None = None,
) -> tuple[GenerationCreated, bool]:
    """As :func:`create`, and whether it is the generation an earlier request with this
    Idempotency-Key made (True), rather than a new one. ``endpoint`` is part of the key's
    request fingerprint (:mod:`tokenrelay.api.idempotency`)."""
    settings = state.settings
    model = body.model or settings.default_model
    problem = check_model(model, settings)
    if problem is not None:
        raise BadRequest(problem, code="unknown_model")
    if body.max_tokens is not None and body.max_tokens > settings.max_tokens_limit:
        raise ValidationFailed(f"max_tokens: at most {settings.max_tokens_limit}")

    gen = streams.NewGeneration(
        id=gen_id or new_generation_id(),
        tenant=tenant,
        model=model,
        request=_job_request(body, model),
        created_at=streams.now(),
    )
    fp = ""
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
        fp = idempotency.fingerprint(endpoint, tenant, {
            **body.model_dump(mode="json", exclude_none=True), "model": model})
        earlier = await idempotency.find(state.redis, tenant, idempotency_key, fp)
        if earlier is not None:
            return await _replayed(state, earlier), True
    await _admit(state, tenant, gen.id)
    try:
        if idempotency_key is not None:
            earlier = await idempotency.claim(
                state.redis, tenant, idempotency_key, fp,
                idempotency.Earlier(gen.id, gen.model, gen.created_at), settings.retention_s)
            if earlier is not None:  # a concurrent retry won the key
                await _release(state, tenant, gen.id)
                return await _replayed(state, earlier), True
        job = queue.first_job(state.queue, gen.id)
        if not enqueue:  # a thread's message waiting for its turn: no job yet
            await streams.create(state.redis, gen, metadata=body.metadata, first=first_event)
            await queue.release_slot(state.queue, gen.id)
        elif settings.queue_shares_redis:
            # The job and the wake-up in the generation's own MULTI: four round trips
            # off the queue hop, and never a generation without its job.
            await streams.create(state.redis, gen, metadata=body.metadata, job=job,
                                 first=first_event)
        else:
            await streams.create(state.redis, gen, metadata=body.metadata, first=first_event)
            await _enqueue_apart(state, job)
    except BaseException:
        await _release(state, tenant, gen.id)
        raise
    state.metrics.created.inc()
    logger.info("created generation_id=%s model=%s tenant=%s", gen.id, gen.model, tenant)
    return _created(state, gen.id, ev.QUEUED, gen.model, gen.created_at), False


async def enqueue(state: AppState, gen_id: str) -> None:
    """Queue the job of a generation created with ``enqueue=False``."""
    await _enqueue_apart(state, queue.first_job(state.queue, gen_id))


async def _enqueue_apart(state: AppState, job: queue.Job) -> None:
    """Queue a recorded generation on the queue's own Redis (QUEUE_REDIS_URL, or a Cluster).

    If that fails, the generation ends with a retryable error rather than wait forever.
    """
    try:
        await queue.enqueue(state.queue, job)
    except (RedisError, OSError):
        with contextlib.suppress(RedisError, OSError):
            await lifecycle.Lifecycle(state.redis, state.settings.retention_s,
                                      jobs=state.queue).end(
                job.gen_id, None,
                lifecycle.failed("unavailable", "the generation could not be queued",
                                 retryable=True))
        raise


async def _admit(state: AppState, tenant: str, gen_id: str) -> None:
    """Queue depth (503) and the tenant's concurrency (429), both with Retry-After."""
    settings = state.settings
    # Atomic, unlike a count then an enqueue: a burst cannot overfill the queue.
    if not await queue.reserve_slot(state.queue, gen_id, settings.max_queue_depth):
        raise Unavailable("the queue is full; retry shortly", code="overloaded", retry_after=5)
    hold_s = settings.max_generation_s + QUEUE_ALLOWANCE_S
    try:
        admitted = await limits.admit(
            state.redis, tenant, gen_id, settings.max_concurrent_per_tenant, hold_s
        )
    except BaseException:
        await queue.release_slot(state.queue, gen_id)
        raise
    if not admitted:
        await queue.release_slot(state.queue, gen_id)
        raise TooManyRequests(
            f"at most {settings.max_concurrent_per_tenant} concurrent generations per tenant",
            retry_after=2,
        )


async def _release(state: AppState, tenant: str, gen_id: str) -> None:
    """Undo ``_admit`` for a generation that was not created."""
    await limits.release(state.redis, tenant, gen_id)
    await queue.release_slot(state.queue, gen_id)


def _job_request(body: GenerationCreate, model: str) -> dict[str, Any]:
    extra: dict[str, Any] = body.sampling()
    if body.tools is not None:
        extra["tools"] = body.tools
    if body.tool_choice is not None:
        extra["tool_choice"] = body.tool_choice
    return {
        "model": model,
        "messages": body.chat_messages(),
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "extra": extra,
        "on_disconnect": body.on_disconnect,
    }


async def _replayed(state: AppState, earlier: idempotency.Earlier) -> GenerationCreated:
    """The answer to a repeated request: the earlier generation, in its current status."""
    status = await streams.read_status(state.redis, earlier.id)
    current = status[0]["status"] if status else ev.QUEUED
    return _created(state, earlier.id, current, earlier.model, earlier.created_at)


def _created(
    state: AppState, gen_id: str, status: str, model: str, created_at: float
) -> GenerationCreated:
    return GenerationCreated(
        id=gen_id,
        status=status,
        model=model,
        created_at=created_at,
        events_url=events_url(gen_id),
        stream_token=state.tokens.issue(gen_id),
    )


async def load(state: AppState, who: Principal, gen_id: str) -> tuple[dict[str, str], str]:
    """(meta, content) of a generation ``who`` may read; NotFound otherwise."""
    found = await streams.read_status(state.redis, gen_id)
    if found is None:
        raise missing(state, gen_id)
    if not who.may_read(gen_id, found[0].get("tenant", "")):
        raise NotFound("no such generation")
    return found


def missing(state: AppState, gen_id: str) -> TokenRelayError:
    """What an id without keys gets: 410 once its retention must be over, else 404.

    Told from the time in the id (:mod:`tokenrelay.shared.ids`), so nothing is kept
    longer; an old-format id, or one not old enough, is simply unknown.
    """
    if past_retention(gen_id, state.settings.retention_s):
        return Gone(f"generation {gen_id} has expired: events and status are kept "
                    f"{state.settings.retention_s}s after it ends", code="gone")
    return NotFound("no such generation")


def status_body(gen_id: str, meta: dict[str, str], content: str) -> GenerationStatus:
    def number(name: str) -> float | None:
        value = meta.get(name)
        return float(value) if value else None

    usage = json.loads(meta["usage"]) if meta.get("usage") else None
    error = ErrorInfo(**json.loads(meta["error"])) if meta.get("error") else None
    status = meta["status"]
    return GenerationStatus(
        id=gen_id,
        status=status,
        model=meta.get("model", ""),
        content=content,
        finish_reason=meta.get("finish_reason") or None,
        usage=usage or None,
        error=error,
        created_at=float(meta.get("created_at", 0)),
        started_at=number("started_at"),
        finished_at=number("finished_at"),
        metadata=json.loads(meta["metadata"]) if meta.get("metadata") else None,
    )


def parse_after(last_event_id: str | None, after: str | None) -> ev.StreamId | None:
    raw = last_event_id if last_event_id is not None else after
    if raw is None or raw == "":
        return None
    try:
        return ev.parse_id(raw.strip())
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid_event_id") from exc


def resume_position(last_event_id: str | None, idempotency_key: str | None) -> ev.StreamId | None:
    """The ``Last-Event-ID`` of a re-sent create (an auto-retrying SSE client): where to
    continue the generation its Idempotency-Key made. Without a key it matches nothing:
    400 ``idempotency_key_required`` (creating another generation would fork the answer)."""
    after = parse_after(last_event_id, None)
    if after is not None and idempotency_key is None:
        raise BadRequest("Last-Event-ID on a create resumes the generation of the same "
                         "Idempotency-Key; send the key of the first request, or resume with "
                         "GET /v1/generations/{id}/events", code="idempotency_key_required")
    return after


async def open_event_stream(
    state: AppState, who: Principal, gen_id: str, after: ev.StreamId | None,
    wire: Wire | None = None,
) -> Response:
    """The event stream of ``gen_id`` for ``who``: 404 unless readable (410 once expired),
    503 at the viewer limit, and 204 when ``after`` is at or past its terminal event:
    nothing more will come (an EventSource that reconnects after the end stops there).

    Authorisation goes through the hub: the channel that loads the stream's tail
    also loads its owner, and the viewer keeps that registration. A stream this
    process already serves is authorised from memory: its thousandth viewer costs
    Redis nothing.
    """
    channel = await state.hub.join(gen_id)
    try:
        if channel.owner is None:
            raise missing(state, gen_id)
        if not who.may_read(gen_id, channel.owner):
            raise NotFound("no such generation")
        if _at_end(channel, after):
            state.hub.leave(channel)
            return Response(status_code=204, headers={"X-Generation-Id": gen_id})
        ensure_viewer_capacity(state)
    except BaseException:
        state.hub.leave(channel)
        raise
    return event_stream(state, gen_id, after, channel=channel, wire=wire)


@dataclass(frozen=True)
class Wire:
    """How an event stream speaks: its view of the events (an encoding or a fold), what
    precedes them, and headers of its own (another client protocol than native SSE)."""

    view: View[bytes] = SSE
    preamble: bytes = ev.RETRY_FRAME
    headers: dict[str, str] = field(default_factory=dict)


async def ended_at(state: AppState, gen_id: str, after: ev.StreamId) -> bool:
    """Whether ``after`` is at or past the terminal event of ``gen_id`` (a readable one):
    a resume with nothing left to send."""
    channel = await state.hub.join(gen_id)
    try:
        return _at_end(channel, after)
    finally:
        state.hub.leave(channel)


def _at_end(channel: Channel, after: ev.StreamId | None) -> bool:
    """Whether ``after`` is at or past the channel's terminal event (always in its memory:
    the last event, and the hub loads the tail)."""
    end = channel.terminal_at
    return after is not None and end is not None and after >= channel.id_at(end)


def event_stream(
    state: AppState, gen_id: str, after: ev.StreamId | None, status_code: int = 200,
    channel: Channel | None = None, wire: Wire | None = None,
) -> EventStreamResponse:
    """The SSE response of one viewer: ``retry:``, replay after ``after``, live, the end.

    ``channel``: the viewer's hub registration, when the caller has joined already.
    ``wire``: another protocol than the native events (default: native SSE).
    """
    wire = wire or Wire()
    return EventStreamResponse(
        Viewer(state.hub, gen_id, after, wire.view, channel),
        state.hub.connections,
        preamble=wire.preamble,
        status_code=status_code,
        headers={"X-Generation-Id": gen_id, **wire.headers},
        label=gen_id,
    )


def ensure_viewer_capacity(state: AppState) -> None:
    """503 + Retry-After when this process already serves MAX_VIEWERS_PER_PROCESS streams."""
    if len(state.hub.connections) >= state.settings.max_viewers_per_process:
        raise Unavailable("this API process is at its viewer limit; retry (any instance)",
                          code="overloaded", retry_after=1)


async def cancel(state: AppState, tenant: str, gen_id: str) -> str:
    outcome = await streams.request_cancel(state.redis, gen_id, tenant, state.settings.retention_s)
    if outcome == "missing":
        raise missing(state, gen_id)
    if outcome == "ended":
        raise Conflict("the generation has already ended", code="already_ended")
    if outcome == "requested":
        await state.queue.publish(keys.CANCEL_CHANNEL, gen_id)  # workers listen there
    elif outcome == "cancelled":  # was queued: ended here, so its slot is free now
        await limits.release(state.redis, tenant, gen_id)
    logger.info("cancel %s generation_id=%s", outcome, gen_id)
    return outcome
