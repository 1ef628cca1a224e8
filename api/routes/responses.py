"""OpenAI Responses routes: POST /v1/responses, GET /v1/responses/{id}, POST …/cancel.

The official ``openai`` SDK's ``client.responses`` works unchanged against them,
background mode included: a stream dropped at any ``sequence_number`` resumes with
``retrieve(id, stream=True, starting_after=N)`` on any API process.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from tokenrelay.api import generations, response_request, responses
from tokenrelay.api.deps import State, Tenant
from tokenrelay.api.routes.openai_compat import CLIENT_CLOSED, json_body

router = APIRouter(prefix="/v1/responses", tags=["openai-compatible"])

_REQUEST_BODY = json_body(
    "An OpenAI Responses request (model, input, instructions, stream, background, "
    "previous_response_id, max_output_tokens, temperature, top_p, tools, tool_choice, text, "
    "metadata).")
_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"description": "The Response object, or with `stream` its events (text/event-stream)"},
    400: {"description": "Bad request (OpenAI error shape)"},
    401: {"description": "No or bad API key"},
    404: {"description": "Unknown response or model"},
}


@router.post("", openapi_extra=_REQUEST_BODY, responses=_ERRORS)
async def create_response(
    request: Request,
    state: State,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    """Create a response: its events with `stream`, at once with `background`, else when done."""
    body = response_request.parse(await request.body())
    if body.stream:
        generations.ensure_viewer_capacity(state)
    gen_id = await responses.create(state, tenant, body, idempotency_key)
    if body.stream:
        return responses.event_stream(state, gen_id, None)
    if body.background:
        queued, _ = await responses.read(state, tenant, responses.response_id(gen_id))
        return JSONResponse(queued.response())
    ended = await responses.follow(state, gen_id, request=request)
    if ended is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(ended.response())


@router.get("/{response_id}", responses=_ERRORS)
async def retrieve_response(
    response_id: str,
    state: State,
    tenant: Tenant,
    stream: Annotated[bool, Query(description="answer with the event stream")] = False,
    starting_after: Annotated[int | None, Query(
        description="with stream: only the events whose sequence_number is above this")] = None,
) -> Response:
    """The Response object; with `stream=true` its events from the start (or after
    `starting_after`), live, to its end."""
    if not stream:
        folded, _ = await responses.read(state, tenant, response_id)
        return JSONResponse(folded.response())
    gen_id = responses.generation_of(response_id)
    return await responses.open_stream(state, tenant, gen_id, starting_after)


@router.post("/{response_id}/cancel", responses=_ERRORS)
async def cancel_response(response_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    """Cancel a response; idempotent (an ended one comes back as it is)."""
    return await responses.cancel(state, tenant, response_id)
