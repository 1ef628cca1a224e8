"""Generation use cases behind the routes: create, read status, stream, cancel."""

from __future__ import annotations

import json
import logging
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import AppState, Principal
from api.schemas import ErrorInfo, GenerationCreate, GenerationCreated, GenerationStatus
from api.streaming import viewer_frames
from shared import events as ev
from shared import keys, streams
from shared.errors import BadRequest, Conflict, NotFound, ValidationFailed
from shared.ids import new_generation_id
from shared.models import check_model

logger = logging.getLogger(__name__)

JOB_NAME = "generate"


def events_url(gen_id: str) -> str:
    return f"/v1/generations/{gen_id}/events"


async def create(
    state: AppState, tenant: str, body: GenerationCreate, idempotency_key: str | None
) -> GenerationCreated:
    """Record the generation (status and its first event), then enqueue it and wake a worker."""
    settings = state.settings
    problem = check_model(body.model, settings)
    if problem is not None:
        raise BadRequest(problem, code="unknown_model")
    if body.max_tokens is not None and body.max_tokens > settings.max_tokens_limit:
        raise ValidationFailed(f"max_tokens: at most {settings.max_tokens_limit}")

    gen = streams.NewGeneration(
        id=new_generation_id(),
        tenant=tenant,
        model=body.model,
        request=_job_request(body),
        created_at=streams.now(),
    )
    if idempotency_key is not None:
        existing = await _claim_idempotency_key(state, tenant, idempotency_key, gen)
        if existing is not None:
            return existing
    await streams.create(state.redis, gen, metadata=body.metadata)
    await state.queue.enqueue_job(JOB_NAME, gen.id, _job_id=gen.id)
    await state.redis.publish(keys.WAKE_CHANNEL, gen.id)
    logger.info("created generation_id=%s model=%s tenant=%s", gen.id, gen.model, tenant)
    return _created(state, gen.id, ev.QUEUED, gen.model, gen.created_at)


def _job_request(body: GenerationCreate) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if body.tools is not None:
        extra["tools"] = body.tools
    if body.tool_choice is not None:
        extra["tool_choice"] = body.tool_choice
    return {
        "model": body.model,
        "messages": body.chat_messages(),
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "extra": extra,
    }


async def _claim_idempotency_key(
    state: AppState, tenant: str, key: str, gen: streams.NewGeneration
) -> GenerationCreated | None:
    if not key or len(key) > 200:
        raise BadRequest("Idempotency-Key must be 1 to 200 characters")
    record = json.dumps({"id": gen.id, "model": gen.model, "created_at": gen.created_at})
    idem_key = keys.idempotency(tenant, key)
    claimed = await state.redis.set(idem_key, record, nx=True, ex=state.settings.retention_s)
    if claimed:
        return None
    raw = await state.redis.get(idem_key)
    if raw is None:  # expired between SET and GET: treat as new
        return None
    earlier = json.loads(raw)
    status = await streams.read_status(state.redis, earlier["id"])
    current = status[0]["status"] if status else ev.QUEUED
    return _created(state, earlier["id"], current, earlier["model"], earlier["created_at"])


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
    if found is None or not who.may_read(gen_id, found[0].get("tenant", "")):
        raise NotFound("no such generation")
    return found


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


def event_stream(
    state: AppState, gen_id: str, after: ev.StreamId | None, status_code: int = 200
) -> EventSourceResponse:
    return EventSourceResponse(
        viewer_frames(state.hub, state.redis, gen_id, after),
        status_code=status_code,
        headers={"X-Generation-Id": gen_id},
        ping=state.settings.heartbeat_s,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        send_timeout=state.settings.send_timeout_s,
        sep="\n",
    )


async def cancel(state: AppState, tenant: str, gen_id: str) -> str:
    outcome = await streams.request_cancel(state.redis, gen_id, tenant, state.settings.retention_s)
    if outcome == "missing":
        raise NotFound("no such generation")
    if outcome == "ended":
        raise Conflict("the generation has already ended", code="already_ended")
    if outcome == "requested":
        await state.redis.publish(keys.CANCEL_CHANNEL, gen_id)
    logger.info("cancel %s generation_id=%s", outcome, gen_id)
    return outcome
