"""Thread use cases behind the routes: create, list, read (JSON or Markdown), post a
message under a busy policy, stream the active answer, delete.

Storage and the one-generation-at-a-time rule live in ``shared.threads``; a thread's
generations are ordinary generations, made by ``api.generations.create`` and read
through the same event stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from tokenrelay.api import generations
from tokenrelay.api.deps import AppState, Principal
from tokenrelay.api.schemas import GenerationCreate, GenerationCreated, Message, OnDisconnect
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, presence, streams
from tokenrelay.shared import threads as store
from tokenrelay.shared.errors import BadRequest, Conflict, NotFound, ValidationFailed
from tokenrelay.shared.models import check_model
from tokenrelay.shared.redis import awaited, text
from tokenrelay.shared.usage import record as count_usage

logger = logging.getLogger(__name__)


class ThreadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, description="system prompt, sent first with every turn")
    model: str | None = Field(None, min_length=1, max_length=200,
                              description="default model of its messages")
    metadata: dict[str, str] | None = None


class ThreadCreated(BaseModel):
    id: str
    created_at: float
    model: str
    metadata: dict[str, str]
    stream_token: str = Field(description="read-only: this thread and its active answer")


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1)
    model: str | None = Field(None, min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    if_busy: Literal["reject", "enqueue", "interrupt"] = Field(
        "reject", description="while another answer runs: 409, run after it, or cancel it")
    on_disconnect: OnDisconnect = Field(
        "continue", description="cancel: stop the answer once nobody has watched it for "
                                "TOKENRELAY_ABANDON_GRACE_S")


class MessageCreated(GenerationCreated):
    thread_id: str


class ThreadMessage(BaseModel):
    id: str
    role: Literal["user", "assistant"]
    content: str
    created_at: float
    generation_id: str
    model: str | None = None
    status: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int | float | bool] | None = None  # tokens; "cost" in USD when priced
    error: dict[str, Any] | None = None


class ThreadBody(BaseModel):
    id: str
    created_at: float
    updated_at: float
    title: str
    system: str
    model: str
    metadata: dict[str, str]
    messages: list[ThreadMessage]
    active_generation_id: str | None
    usage: dict[str, int | float] = Field(
        description="totals over its ended answers: tokens, and cost (USD) when priced")
    cost: float | None = Field(None, description="usage.cost (null: no answer was priced)")
    viewers: int = Field(0, description="viewers of the active answer, on any API process")
    stream_token: str | None = Field(
        None, description="a fresh read-only token for this thread (share link, EventSource); "
                          "only for its tenant, never renewed for a token holder")


class ThreadSummary(BaseModel):
    id: str
    title: str
    created_at: float
    updated_at: float
    model: str
    metadata: dict[str, str]
    active_generation_id: str | None
    message_count: int = Field(description="user and assistant messages (two per turn)")


class ThreadList(BaseModel):
    data: list[ThreadSummary]
    next_cursor: str | None


def _summary(thread: store.Thread) -> ThreadSummary:
    return ThreadSummary(id=thread.id, title=thread.title, created_at=thread.created_at,
                         updated_at=thread.updated_at, model=thread.model,
                         metadata=thread.metadata, active_generation_id=thread.active,
                         message_count=2 * thread.turn_count)


def _check_content(state: AppState, name: str, value: str) -> None:
    limit = state.settings.thread_max_message_chars
    if len(value) > limit:
        raise ValidationFailed(f"{name}: at most {limit} characters")


def _check_model(state: AppState, model: str) -> None:
    problem = check_model(model, state.settings)
    if problem is not None:
        raise BadRequest(problem, code="unknown_model")


async def create(state: AppState, tenant: str, body: ThreadCreate,
                 thread_id: str | None = None) -> ThreadCreated:
    """A new thread; ``thread_id`` names it (Conflict if it exists: it is left as it is)."""
    model = body.model or state.settings.default_model
    _check_model(state, model)
    _check_content(state, "system", body.system or "")
    thread = await store.create(state.redis, tenant, system=body.system or "", model=model,
                                metadata=body.metadata,
                                retention_s=state.settings.thread_retention_s,
                                thread_id=thread_id)
    logger.info("created thread_id=%s tenant=%s", thread.id, tenant)
    return ThreadCreated(id=thread.id, created_at=thread.created_at, model=thread.model,
                         metadata=thread.metadata, stream_token=state.tokens.issue(thread.id))


async def list_page(state: AppState, tenant: str, limit: int, cursor: str | None) -> ThreadList:
    try:
        page, next_cursor = await store.list_threads(state.redis, tenant, limit, cursor)
    except ValueError as exc:
        raise BadRequest("cursor: not one this API returned") from exc
    return ThreadList(data=[_summary(t) for t in page], next_cursor=next_cursor)


async def load(state: AppState, who: Principal, thread_id: str) -> store.Thread:
    """The thread, if ``who`` may read it (its tenant, or a token for it); NotFound otherwise."""
    thread = await store.load(state.redis, thread_id)
    if thread is None or not who.may_read(thread_id, thread.tenant):
        raise NotFound("no such thread")
    return thread


async def body(state: AppState, thread: store.Thread) -> ThreadBody:
    """The thread as the API shows it; an answer still being written shows its text so far."""
    unrecorded = [t.generation_id for t in thread.turns if t.generation_id not in thread.replies]
    live = dict(zip(unrecorded, await asyncio.gather(
        *(streams.read_status(state.redis, gen_id) for gen_id in unrecorded)), strict=True))
    messages: list[ThreadMessage] = []
    for turn in thread.turns:
        gen_id = turn.generation_id
        messages.append(ThreadMessage(id=turn.id, role="user", content=turn.content,
                                      created_at=turn.created_at, generation_id=gen_id))
        reply = thread.replies.get(gen_id)
        if reply is None:
            found = live.get(gen_id)
            reply = store.Reply.of_generation(found) if found else store.Reply(
                "", ev.QUEUED, turn.model, turn.created_at)
        messages.append(ThreadMessage(
            id=turn.reply_id, role="assistant", content=reply.content,
            created_at=reply.created_at, generation_id=gen_id, model=reply.model or turn.model,
            status=reply.status, finish_reason=reply.finish_reason, usage=reply.usage,
            error=reply.error,
        ))
    return ThreadBody(
        id=thread.id, created_at=thread.created_at, updated_at=thread.updated_at,
        title=thread.title, system=thread.system, model=thread.model,
        metadata=thread.metadata, messages=messages, active_generation_id=thread.active,
        usage=thread.usage, cost=thread.usage.get("cost"),
        viewers=await presence.count(state.redis, thread.active) if thread.active else 0,
    )


def _starter(state: AppState) -> store.StartJob:
    return partial(generations.enqueue, state)


async def post_message(
    state: AppState, tenant: str, thread_id: str, message: MessageCreate
) -> MessageCreated:
    """Store the user message and start (or queue) the generation that answers it.

    The generation is recorded first, without its job; the thread's slot is then
    claimed atomically. A busy thread (``reject``) or a thread deleted meanwhile
    removes that generation again, so a refused message leaves nothing behind.
    """
    if not message.content.strip():
        raise ValidationFailed("content: must not be blank")
    _check_content(state, "content", message.content)
    owner, default_model = await awaited(
        state.redis.hmget(keys.thread_meta(thread_id), ["tenant", "model"]))
    if owner is None or text(owner) != tenant:
        raise NotFound("no such thread")
    model = message.model or text(default_model or b"") or state.settings.default_model
    request = GenerationCreate(
        model=model, messages=[Message(role="user", content=message.content)],
        max_tokens=message.max_tokens, temperature=message.temperature,
        metadata={"thread_id": thread_id}, on_disconnect=message.on_disconnect,
    )
    created = await generations.create(state, tenant, request, None, enqueue=False)
    turn = store.Turn(id=store.new_message_id(), reply_id=store.new_message_id(),
                      content=message.content, created_at=created.created_at,
                      generation_id=created.id, model=model)
    start_job = _starter(state)
    try:
        claim = await _claim(state, tenant, thread_id, turn, message.if_busy)
        if claim.outcome == "busy" and claim.active is not None and await store.repair(
            state.redis, thread_id, claim.active, start_job
        ):
            claim = await _claim(state, tenant, thread_id, turn, message.if_busy)
    except BaseException:
        await store.discard_generation(state.redis, tenant, created.id)
        raise
    if claim.outcome in ("busy", "missing"):
        await store.discard_generation(state.redis, tenant, created.id)
        if claim.outcome == "missing":
            raise NotFound("no such thread")
        raise Conflict(f"generation {claim.active} of this thread is still running; "
                       "retry later or post with if_busy enqueue or interrupt",
                       code="thread_busy")
    logger.info("message %s thread_id=%s generation_id=%s", claim.outcome, thread_id, created.id)
    if claim.outcome == "start":
        await store.start_turn(state.redis, thread_id, created.id, start_job)
    elif claim.active is not None:
        if claim.outcome == "interrupt":
            for gen_id in claim.dropped:  # enqueued ones this message replaces
                await _cancel(state, tenant, gen_id)
                await store.settle(state.redis, thread_id, gen_id, start_job)
            await _cancel(state, tenant, claim.active)
        # Hand over at once if the active one has ended already (cancelled while queued,
        # or its worker's end hook has not run yet).
        await store.repair(state.redis, thread_id, claim.active, start_job)
    return MessageCreated(**created.model_dump(), thread_id=thread_id)


async def _claim(state: AppState, tenant: str, thread_id: str, turn: store.Turn,
                 if_busy: str) -> store.Claim:
    return await store.claim(state.redis, thread_id, tenant, turn, if_busy,
                             retention_s=state.settings.thread_retention_s,
                             context_chars=state.settings.thread_context_chars)


async def _cancel(state: AppState, tenant: str, gen_id: str) -> None:
    """Cancel a thread's generation if it still runs (an ended one is fine)."""
    try:
        outcome = await generations.cancel(state, tenant, gen_id)
    except (NotFound, Conflict):
        return
    if outcome == "cancelled":
        # Ended while queued; it may never get a job that would count it.
        await count_usage(state.redis, gen_id, state.settings.retention_s)


async def active_stream(
    state: AppState, who: Principal, thread_id: str, after: ev.StreamId | None
) -> Response | None:
    """The event stream of the thread's active generation; None (204) if none is active."""
    found = await active_generation(state, who, thread_id, after)
    if found is None:
        return None
    owner, gen_id = found
    response = await generations.open_event_stream(state, Principal(owner), gen_id, after)
    response.raw_headers.append((b"x-thread-id", thread_id.encode()))
    return response


async def active_generation(
    state: AppState, who: Principal, thread_id: str, after: ev.StreamId | None
) -> tuple[str, str] | None:
    """(owner, id) of the thread's active generation; None if none is active.

    A generation that has ended but not yet left the slot is still streamed to a
    client that has not seen its end (``after`` before its last event).
    """
    owner, active = await awaited(
        state.redis.hmget(keys.thread_meta(thread_id), ["tenant", "active"]))
    if owner is None or not who.may_read(thread_id, text(owner)):
        raise NotFound("no such thread")
    gen_id = text(active or b"")
    if not gen_id:
        return None
    status = await awaited(state.redis.hget(keys.meta(gen_id), "status"))
    if status is None:
        return None
    if text(status) in ev.TERMINAL_STATUSES:
        if after is None:
            return None
        last = await state.redis.xrevrange(keys.events(gen_id), count=1)
        if not last or ev.parse_id(text(last[0][0])) <= after:
            return None
    return text(owner), gen_id


async def delete(state: AppState, tenant: str, thread_id: str) -> None:
    """Delete the thread's keys at once, then cancel what it still ran or had queued."""
    to_cancel = await store.delete(state.redis, thread_id, tenant)
    if to_cancel is None:
        raise NotFound("no such thread")
    for gen_id in to_cancel:
        await _cancel(state, tenant, gen_id)
    logger.info("deleted thread_id=%s cancelled=%d", thread_id, len(to_cancel))


def markdown(thread: ThreadBody) -> str:
    """The conversation as Markdown, with a YAML front matter (JSON scalars are YAML)."""
    def scalar(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    front = [
        "---",
        f"id: {scalar(thread.id)}",
        f"title: {scalar(thread.title)}",
        f"model: {scalar(thread.model)}",
        f"created_at: {scalar(_iso(thread.created_at))}",
        f"updated_at: {scalar(_iso(thread.updated_at))}",
        "usage:",
        *(f"  {name}: {_number(value)}" for name, value in thread.usage.items()),
    ]
    if thread.cost is not None:
        front.append(f"cost: {_number(thread.cost)}")
    if thread.metadata:
        front.append("metadata:")
        front += [f"  {scalar(k)}: {scalar(v)}" for k, v in thread.metadata.items()]
    front.append("---")
    parts = ["\n".join(front)]
    if thread.system:
        parts.append(f"## System\n\n{thread.system}")
    for message in thread.messages:
        heading = "## User" if message.role == "user" else "## Assistant"
        if message.role == "assistant" and message.model and message.model != thread.model:
            heading += f" ({message.model})"
        text = message.content
        if message.role == "assistant" and message.status != ev.COMPLETED:
            text += f"\n\n*[{message.status}]*"
        parts.append(f"{heading}\n\n{text}")
    return "\n\n".join(parts) + "\n"


def _number(value: float) -> str:
    """A number as YAML 1.1 and 1.2 both read it: no exponent (``1e-05`` is a string in 1.1)."""
    return str(value) if isinstance(value, int) else f"{value:.10f}".rstrip("0").rstrip(".")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")

