"""OpenAI-compatible routes: POST /v1/chat/completions and GET /v1/models.

A chat completion is an ordinary generation (same queue, same stream), so it
keeps going if the client drops, and its ``X-Generation-Id`` and the ``id:``
lines of its chunks let a client resume or share it through the native API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse

from tokenrelay.api import generations, openai_request
from tokenrelay.api.channel import events_after
from tokenrelay.api.deps import AppState, State, Tenant
from tokenrelay.api.openai_errors import OpenAIError
from tokenrelay.api.openai_response import HEARTBEAT, ChunkStream, Completion, with_heartbeat
from tokenrelay.shared.events import Event, StreamId
from tokenrelay.shared.models import available_models, check_model

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai-compatible"])
# This endpoint, as an Idempotency-Key's request fingerprint names it.
ENDPOINT = "POST /v1/chat/completions"



def json_body(description: str) -> dict[str, Any]:
    """An endpoint's request body in the OpenAPI document: a JSON object read by hand (so that
    errors come in OpenAI's shape, not FastAPI's), described in words."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"type": "object", "description": description}}}}}


_REQUEST_BODY = json_body(
    "An OpenAI Chat Completions request (model, messages, stream, stream_options, max_tokens | "
    "max_completion_tokens, temperature, tools, tool_choice, metadata).")
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Bad request (OpenAI error shape)"},
    401: {"description": "No or bad API key"},
    404: {"description": "Unknown model"},
    409: {"description": "Non-stream: the generation was cancelled"},
    502: {"description": "Non-stream: the generation failed upstream"},
}
# Clients disconnected while waiting for a non-stream answer get this (nobody reads it).
CLIENT_CLOSED = 499


@router.post("/chat/completions", openapi_extra=_REQUEST_BODY, responses=_ERRORS)
async def chat_completions(
    request: Request,
    state: State,
    tenant: Tenant,
    idempotency_key: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """OpenAI Chat Completions over tokenrelay: `stream: true` for chunks, else one completion.

    A stream sent again with the same `Idempotency-Key` and a `Last-Event-ID` (the `id:`
    of the last chunk received) goes on after it; 204 if nothing is left.
    """
    after = generations.resume_position(last_event_id, idempotency_key)
    body = openai_request.parse(await request.body())
    native = openai_request.to_generation(body, state.settings)
    created, replayed = await generations.create_or_replay(state, tenant, native,
                                                           idempotency_key, endpoint=ENDPOINT)
    # The generation's id and read-only stream token, for clients that know tokenrelay:
    # resume through /v1/generations/{id}/events, share a live view with ?token=.
    headers = {"X-Generation-Id": created.id, "X-Stream-Token": created.stream_token}
    if body.stream:
        resume = after if replayed else None
        if resume is not None and await generations.ended_at(state, created.id, resume):
            return Response(status_code=204, headers=headers)
        view = ChunkStream(created.id, body.model, int(created.created_at), body.include_usage)
        return EventSourceResponse(
            _chunk_frames(state, created.id, view, resume),
            headers=headers,
            ping=0,  # our own heartbeat: see api.openai_response.HEARTBEAT
            send_timeout=state.settings.send_timeout_s,
            sep="\n",
        )
    completion = Completion(created.id, body.model, int(created.created_at))
    if not await _wait(state, request, created.id, completion):
        return Response(status_code=CLIENT_CLOSED)
    try:
        return JSONResponse(completion.body(), headers=headers)
    except OpenAIError as exc:
        exc.headers.update(headers)
        raise


def _events(
    state: AppState, gen_id: str, after: StreamId | None = None
) -> contextlib.aclosing[AsyncGenerator[Event | None, None]]:
    """The generation's typed events after ``after`` (None: from its start), None after
    each quiet HEARTBEAT_S.

    Closing it (on leaving the ``async with``) leaves the hub at once.
    """
    events = events_after(state.hub, gen_id, after)
    return contextlib.aclosing(with_heartbeat(events, state.settings.heartbeat_s))


async def _chunk_frames(state: AppState, gen_id: str, view: ChunkStream,
                        after: StreamId | None = None) -> AsyncIterator[bytes]:
    try:
        async with _events(state, gen_id, after) as events:
            async for event in events:
                if event is None:
                    yield HEARTBEAT
                    continue
                out = view.frames(event)
                if out:
                    yield out
                if view.finished:
                    return
    except (RedisError, OSError) as exc:
        # Headers are sent: say so in the stream rather than end it as if complete.
        logger.warning("chat stream lost its storage generation_id=%s: %s", gen_id, exc)
        yield view.fail(OpenAIError(503, "redis_unavailable", "storage is unavailable; resume "
                                    f"from /v1/generations/{gen_id}/events", type_="server_error"))
        return
    yield view.fail(_stream_lost(gen_id))  # the events expired under us: no terminal event


async def _wait(state: AppState, request: Request, gen_id: str, completion: Completion) -> bool:
    """Feed ``completion`` until the terminal event; False if the client left first. Its
    viewer then leaves the hub at once, so the generation's on_disconnect applies."""
    feeding = asyncio.create_task(_feed(state, gen_id, completion))
    leaving = asyncio.create_task(_client_gone(request))
    try:
        await asyncio.wait({feeding, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not feeding.done():
            feeding.cancel()
        await asyncio.wait({feeding, leaving})
    return False if feeding.cancelled() else feeding.result()


async def _feed(state: AppState, gen_id: str, completion: Completion) -> bool:
    async with _events(state, gen_id) as events:
        async for event in events:
            if event is not None and completion.feed(event):
                return True
    raise _stream_lost(gen_id)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (its body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _stream_lost(gen_id: str) -> OpenAIError:
    return OpenAIError(502, "stream_lost", f"the events of generation {gen_id} are no longer "
                       "available", type_="server_error")


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "tokenrelay"}


@router.get("/models", responses=_ERRORS)
async def list_models(state: State, tenant: Tenant) -> dict[str, Any]:
    """The fake models, then TOKENRELAY_OPENAI_MODELS, or else the upstream's own list."""
    models = await available_models(state.settings)
    return {"object": "list", "data": [_model_object(m) for m in models]}


@router.get("/models/{model_id:path}", responses=_ERRORS)
async def retrieve_model(model_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    """One model, if this deployment can serve it."""
    problem = check_model(model_id, state.settings)
    if problem is not None:
        raise OpenAIError(404, "model_not_found", problem, param="model")
    return _model_object(model_id)
