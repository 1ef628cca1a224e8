"""The Vercel AI SDK's chat over threads: what ``DefaultChatTransport`` posts becomes a
message of a thread, and its answer is streamed in the UI message stream protocol.

A chat id is chosen by the client (``useChat`` makes one); within a tenant it names one
thread, ``thr_`` + a hash of (tenant, chat id), made on its first message. The thread
holds the history, so only the last message of what the client sends is new. A resume
(``GET …/{chat id}/stream``) replays the answer being written from its start, opened by
a ``start`` chunk that names the thread's assistant message, so a client that replaces
the message it resumes (``resumeStreamIsReplay``) has every part exactly once.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from tokenrelay.api import generations, threads, ui_stream
from tokenrelay.api.deps import AppState, Principal
from tokenrelay.api.sse import EventStreamResponse
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys
from tokenrelay.shared import threads as store
from tokenrelay.shared.errors import BadRequest, Conflict, ValidationFailed
from tokenrelay.shared.redis import awaited, text

logger = logging.getLogger(__name__)

CHAT_ID_MAX = 200
RESTART_PAGE = 500  # events per read when looking back for a restart


class UIPart(BaseModel):
    """A part of a UIMessage; only ``text`` parts are read (others are the client's own)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class UIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    role: Literal["system", "user", "assistant"]
    parts: list[UIPart]


class ChatRequest(BaseModel):
    """What ``DefaultChatTransport.sendMessages`` posts: its own fields, then the transport's
    ``body`` (model and options). Other fields, which apps add to ``body``, are ignored."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=CHAT_ID_MAX, description="the chat id")
    messages: list[UIMessage] = Field(min_length=1, description="the chat; the last is new")
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = None  # the AI SDK's name: the message regenerated
    model: str | None = Field(None, min_length=1, max_length=200)
    system: str | None = Field(None, description="system prompt of a chat's new thread")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    if_busy: Literal["reject", "enqueue", "interrupt"] = "reject"


def chat_thread_id(tenant: str, chat_id: str) -> str:
    """The thread a tenant's chat id names (another tenant's same chat id is another one)."""
    digest = hashlib.sha256(f"ai-sdk\0{tenant}\0{chat_id}".encode()).hexdigest()
    return f"thr_{digest[:32]}"


def check_chat_id(chat_id: str) -> None:
    if not chat_id or len(chat_id) > CHAT_ID_MAX:
        raise BadRequest(f"chat id: 1 to {CHAT_ID_MAX} characters", code="invalid_chat_id")


def new_text(request: ChatRequest) -> str:
    """The text of the message the client adds: the last one, a user message."""
    if request.trigger != "submit-message":
        raise BadRequest("regenerate-message is not supported: a thread's answers are kept; "
                         "send the message again instead", code="unsupported_trigger")
    last = request.messages[-1]
    if last.role != "user":
        raise ValidationFailed("messages: the last one must be the user's new message")
    if any(part.type == "file" for part in last.parts):
        raise BadRequest("file parts are not supported", code="unsupported_part")
    content = "".join(part.text or "" for part in last.parts if part.type == "text")
    if not content.strip():
        raise ValidationFailed("messages: the last one has no text")
    return content


def _wire(thread_id: str, message_id: str | None) -> generations.Wire:
    """The UI message stream; from the start of a message (``message_id``), its ``start``."""
    preamble = ev.RETRY_FRAME
    if message_id is not None:
        preamble += ui_stream.start_frame(message_id)
    return generations.Wire(ui_stream.UI_STREAM, preamble,
                            {**ui_stream.HEADERS, "X-Thread-Id": thread_id})


async def send(state: AppState, tenant: str, request: ChatRequest) -> EventStreamResponse:
    """Post the chat's new message to its thread (made if new) and stream the answer.

    A thread made here for a message that is then refused (bad model, busy, limits) is
    deleted again, so a refused request leaves nothing behind.
    """
    content = new_text(request)
    generations.ensure_viewer_capacity(state)
    thread_id = chat_thread_id(tenant, request.id)
    made = False
    try:
        await threads.create(state, tenant, threads.ThreadCreate(
            system=request.system, model=request.model), thread_id=thread_id)
        made = True
    except Conflict:
        pass  # the chat's thread, from an earlier message
    message = threads.MessageCreate(content=content, model=request.model,
                                    max_tokens=request.max_tokens,
                                    temperature=request.temperature, if_busy=request.if_busy)
    try:
        created = await threads.post_message(state, tenant, thread_id, message)
    except BaseException:
        if made:
            await store.delete(state.redis, thread_id, tenant)
        raise
    logger.info("ai-sdk chat thread_id=%s generation_id=%s", thread_id, created.id)
    reply = await _reply_id(state, thread_id, created.id)
    return generations.event_stream(state, created.id, None, wire=_wire(thread_id, reply))


async def resume(
    state: AppState, tenant: str, chat_id: str, after: ev.StreamId | None
) -> Response | None:
    """The answer being written, from its start (or after ``after``); None (204) if none.

    From the start, only an answer still being written is streamed. After an event id
    (an EventSource reconnecting), the chat's latest answer is streamed if it has events
    after that one, even if it has ended meanwhile: the client has not seen its end.
    An unknown chat has no answer being written: None, and nothing is made.
    """
    check_chat_id(chat_id)
    thread_id = chat_thread_id(tenant, chat_id)
    owner, active = await awaited(
        state.redis.hmget(keys.thread_meta(thread_id), ["tenant", "active"]))
    if owner is None or text(owner) != tenant:
        return None
    gen_id = text(active or b"")
    if after is None:
        if not gen_id:
            return None
        status, attempt = await awaited(
            state.redis.hmget(keys.meta(gen_id), ["status", "attempt"]))
        if status is None or text(status) in ev.TERMINAL_STATUSES:
            return None
        # A restarted answer is replayed from its restart: the parts of the lost attempt
        # cannot be taken back, and the fold's parts after a restart stand on their own.
        start = await _last_restart(state, gen_id) if int(text(attempt or b"0")) > 1 else None
        reply = await _reply_id(state, thread_id, gen_id)
        return await generations.open_event_stream(
            state, Principal(tenant), gen_id, start, _wire(thread_id, reply))
    if not gen_id:
        latest = await awaited(state.redis.lindex(keys.thread_turns(thread_id), -1))
        if latest is None:
            return None
        gen_id = store.Turn.decode(latest).generation_id
    last = await state.redis.xrevrange(keys.events(gen_id), count=1)
    if not last or ev.parse_id(text(last[0][0])) <= after:
        return None
    return await generations.open_event_stream(
        state, Principal(tenant), gen_id, after, _wire(thread_id, None))


async def _last_restart(state: AppState, gen_id: str) -> ev.StreamId | None:
    """The id of the stream's last ``restarted`` event, read back from its end (only
    generations whose worker was lost pay for it)."""
    end = "+"
    while page := await state.redis.xrevrange(keys.events(gen_id), end, "-", count=RESTART_PAGE):
        for entry_id, fields in page:
            event = ev.decode_entry(entry_id, fields)
            if event.type == ev.STATUS and event.data.get("status") == ev.RESTARTED:
                return ev.parse_id(event.id)
        end = f"({text(page[-1][0])}"
    return None


async def _reply_id(state: AppState, thread_id: str, gen_id: str) -> str:
    """The id of the thread's assistant message that ``gen_id`` writes (the UI's message id)."""
    for raw in reversed(await awaited(state.redis.lrange(keys.thread_turns(thread_id), 0, -1))):
        turn = store.Turn.decode(raw)
        if turn.generation_id == gen_id:
            return turn.reply_id
    return f"msg_{gen_id}"  # the thread was deleted meanwhile: any stable id will do
