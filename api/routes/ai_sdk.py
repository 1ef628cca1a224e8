"""Vercel AI SDK routes: ``useChat`` / ``DefaultChatTransport`` with ``api`` set to
``…/v1/ai-sdk/chat`` (and ``resume: true`` for the GET)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from tokenrelay.api import ai_sdk, generations
from tokenrelay.api.deps import State, Tenant
from tokenrelay.api.sse import EventStreamResponse

router = APIRouter(prefix="/v1/ai-sdk", tags=["vercel-ai-sdk"])

_STREAM = {"content": {"text/event-stream": {}},
           "description": "The UI message stream (header x-vercel-ai-ui-message-stream: v1)"}
_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"description": "Bad input (invalid JSON, unknown model, regenerate, file parts)"},
    401: {"description": "No or bad API key"},
    409: {"description": "thread_busy: the chat's answer is still being written"},
    422: {"description": "Body fails the schema (no messages, last one not the user's)"},
}


@router.post("/chat", response_class=EventStreamResponse, responses={**_ERRORS, 200: _STREAM})
async def chat(body: ai_sdk.ChatRequest, state: State, tenant: Tenant) -> Response:
    """Add the last message to the chat's thread (made on first use) and stream the answer."""
    return await ai_sdk.send(state, tenant, body)


@router.get(
    "/chat/{chat_id:path}/stream",
    response_class=EventStreamResponse,
    responses={**_ERRORS, 200: _STREAM, 204: {"description": "No answer is being written"}},
)
async def resume_chat(
    chat_id: str,
    state: State,
    tenant: Tenant,
    after: Annotated[str | None, Query(description="resume after this event id")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """The answer being written, replayed from its start (`Last-Event-ID`: after it); 204
    if none."""
    resume_after = generations.parse_after(last_event_id, after)
    stream = await ai_sdk.resume(state, tenant, chat_id, resume_after)
    return Response(status_code=204) if stream is None else stream
