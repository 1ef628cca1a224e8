"""Native generation routes: create, status, events (SSE), cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from tokenrelay.api import generations
from tokenrelay.api.deps import GenerationId, Principal, Reader, State, Tenant
from tokenrelay.api.schemas import GenerationCreate, GenerationCreated, GenerationStatus
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.shared import presence

router = APIRouter(prefix="/v1/generations", tags=["generations"])

_ERRORS: dict[int | str, dict[str, str]] = {
    400: {"description": "Bad input (invalid JSON, unknown model, malformed event id)"},
    401: {"description": "No or bad credentials"},
    404: {"description": "Unknown generation, or not yours"},
    410: {"description": "The generation expired: its retention is over"},
    422: {"description": "Body fails the schema"},
}


@router.post(
    "",
    status_code=202,
    response_model=GenerationCreated,
    responses={**_ERRORS, 200: {"description": "With Accept: text/event-stream: the events"}},
)
async def create_generation(
    body: GenerationCreate,
    request: Request,
    response: Response,
    state: State,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> GenerationCreated | Response:
    """Queue a generation. With `Accept: text/event-stream`, answer with its event stream.

    Sent again with the same `Idempotency-Key` and a `Last-Event-ID`, the stream goes
    on after that event (204 if it was the last); a `Last-Event-ID` without the key is
    a 400 `idempotency_key_required`.
    """
    wants_stream = "text/event-stream" in request.headers.get("accept", "")
    after = generations.resume_position(last_event_id, idempotency_key)
    if wants_stream:
        generations.ensure_viewer_capacity(state)
    created, replayed = await generations.create_or_replay(state, tenant, body, idempotency_key)
    if wants_stream:
        if replayed and after is not None:
            return await generations.open_event_stream(state, Principal(tenant), created.id,
                                                       after)
        return generations.event_stream(state, created.id, None)
    response.headers["Location"] = f"/v1/generations/{created.id}"
    return created


@router.get("/{gen_id}", response_model=GenerationStatus, responses=_ERRORS)
async def get_generation(gen_id: GenerationId, state: State, who: Reader) -> GenerationStatus:
    """Status of a generation, with all its text so far and its viewers."""
    meta, content = await generations.load(state, who, gen_id)
    body = generations.status_body(gen_id, meta, content)
    body.viewers = await presence.count(state.redis, gen_id)
    return body


@router.get(
    "/{gen_id}/events",
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}},
               204: {"description": "Resumed at or past the terminal event: nothing more"}},
    response_class=EventStreamResponse,
)
async def stream_events(
    gen_id: GenerationId,
    state: State,
    who: Reader,
    after: Annotated[str | None, Query(description="resume after this event id")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Replay every event after `Last-Event-ID` (or `?after=`), follow live, end after the last."""
    resume_after = generations.parse_after(last_event_id, after)
    return await generations.open_event_stream(state, who, gen_id, resume_after)


@router.post("/{gen_id}/cancel", status_code=202, responses={**_ERRORS, 409: {}})
async def cancel_generation(gen_id: GenerationId, state: State, tenant: Tenant) -> dict[str, str]:
    """Stop a generation: the worker closes the upstream call; the stream ends `cancelled`."""
    outcome = await generations.cancel(state, tenant, gen_id)
    return {"id": gen_id, "cancel": outcome}
