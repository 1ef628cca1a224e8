"""Thread routes: conversations whose assistant turns are generations."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse

from tokenrelay.api import generations, threads
from tokenrelay.api.deps import Reader, State, Tenant
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.shared.errors import NotFound
from tokenrelay.shared.threads import is_thread_id

router = APIRouter(prefix="/v1/threads", tags=["threads"])

_ERRORS: dict[int | str, dict[str, str]] = {
    400: {"description": "Bad input (invalid JSON, unknown model, malformed event id or cursor)"},
    401: {"description": "No or bad credentials"},
    404: {"description": "Unknown thread, or not yours"},
    422: {"description": "Body fails the schema (empty or too long content, unknown if_busy)"},
}


async def thread_id(thread_id: str) -> str:
    if not is_thread_id(thread_id):
        raise NotFound("no such thread")
    return thread_id


ThreadId = Annotated[str, Depends(thread_id)]


@router.post("", status_code=201, response_model=threads.ThreadCreated, responses=_ERRORS)
async def create_thread(
    state: State, tenant: Tenant, response: Response, body: threads.ThreadCreate | None = None
) -> threads.ThreadCreated:
    """Start a conversation. Its `stream_token` reads it and its active answer, nothing else."""
    created = await threads.create(state, tenant, body or threads.ThreadCreate())
    response.headers["Location"] = f"/v1/threads/{created.id}"
    return created


@router.get("", response_model=threads.ThreadList, responses=_ERRORS)
async def list_threads(
    state: State,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> threads.ThreadList:
    """Your threads, newest activity first, each titled by the start of its first message."""
    return await threads.list_page(state, tenant, limit, cursor)


@router.get(
    "/{thread_id}",
    response_model=threads.ThreadBody,
    responses={**_ERRORS, 200: {"content": {"text/markdown": {}}}},
)
async def get_thread(
    thread_id: ThreadId,
    state: State,
    who: Reader,
    format: Annotated[Literal["json", "markdown"], Query()] = "json",
) -> threads.ThreadBody | PlainTextResponse:
    """The thread and its messages; `?format=markdown` exports it with a YAML front matter."""
    body = await threads.body(state, await threads.load(state, who, thread_id))
    if format == "markdown":
        return PlainTextResponse(threads.markdown(body), media_type="text/markdown")
    if who.generation is None:  # the tenant: a page that reopens the thread needs a token
        body.stream_token = state.tokens.issue(thread_id)
    return body


@router.post(
    "/{thread_id}/messages",
    status_code=202,
    response_model=threads.MessageCreated,
    responses={**_ERRORS, 409: {"description": "thread_busy (if_busy: reject)"},
               200: {"description": "With Accept: text/event-stream: the events"}},
)
async def post_message(
    thread_id: ThreadId,
    message: threads.MessageCreate,
    request: Request,
    response: Response,
    state: State,
    tenant: Tenant,
    last_event_id: Annotated[str | None, Header()] = None,
) -> threads.MessageCreated | EventStreamResponse:
    """Add a user message and answer it with the thread's history as context.

    A re-sent message (`Last-Event-ID`, an auto-retrying SSE client) is refused with 400
    `idempotency_key_required` rather than posted twice: resume with `GET …/stream`.
    """
    generations.resume_position(last_event_id, None)
    wants_stream = "text/event-stream" in request.headers.get("accept", "")
    if wants_stream:
        generations.ensure_viewer_capacity(state)
    created = await threads.post_message(state, tenant, thread_id, message)
    if wants_stream:
        stream = generations.event_stream(state, created.id, None)
        stream.raw_headers.append((b"x-thread-id", thread_id.encode()))
        return stream
    response.headers["Location"] = f"/v1/generations/{created.id}"
    return created


@router.get(
    "/{thread_id}/stream",
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}},
               204: {"description": "No answer is being written"}},
    response_class=EventStreamResponse,
)
async def stream_thread(
    thread_id: ThreadId,
    state: State,
    who: Reader,
    after: Annotated[str | None, Query(description="resume after this event id")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """The event stream of the answer being written (`Last-Event-ID` honoured); 204 if none."""
    resume_after = generations.parse_after(last_event_id, after)
    stream = await threads.active_stream(state, who, thread_id, resume_after)
    return Response(status_code=204) if stream is None else stream


@router.delete("/{thread_id}", status_code=204, responses=_ERRORS)
async def delete_thread(thread_id: ThreadId, state: State, tenant: Tenant) -> Response:
    """Delete the thread (every message) and cancel its running and queued answers."""
    await threads.delete(state, tenant, thread_id)
    return Response(status_code=204)
