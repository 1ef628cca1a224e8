"""Threads in Redis: a conversation's messages, and one generation at a time per thread.

A thread's keys share the hash tag ``{thr_…}`` (one Cluster slot), so each change of
a thread is one Lua script: :func:`claim` takes the active slot and appends the user
message in one step (concurrent posts on any API process cannot both start a
generation), and :func:`on_generation_end` records an ended generation's text as
the assistant message and hands the slot to the next enqueued generation::

    post ──claim──> slot free: start now │ busy: reject | enqueue | interrupt
    terminal event ──on_generation_end──> reply recorded ──> next pending one started

Assistant messages are stored per generation and shown after their user message,
so the order of answers always follows the order of questions. Every write
refreshes every key's TTL (``ttl`` in the thread, set from THREAD_RETENTION_S by
the API's last write), so a thread expires as a whole after its last activity.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis

from tokenrelay.shared import costs, keys, limits, streams, thread_index
from tokenrelay.shared import events as ev
from tokenrelay.shared import thread_scripts as scripts
from tokenrelay.shared.errors import Conflict
from tokenrelay.shared.redis import awaited, text
from tokenrelay.shared.usage import record as count_usage

logger = logging.getLogger(__name__)

# Puts a generation's job on the queue (the API's enqueue, or the worker's enqueue_attempt).
StartJob = Callable[[str], Awaitable[None]]

IF_BUSY = ("reject", "enqueue", "interrupt")
TITLE_CHARS = 80
# A claimed generation still unstarted after this long lost its API process: start it.
STUCK_AFTER_S = 10.0
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")

_THREAD_ID_RE = re.compile(r"^thr_[0-9a-f]{32}$")



def new_thread_id() -> str:
    return f"thr_{secrets.token_hex(16)}"


def is_thread_id(value: str) -> bool:
    return _THREAD_ID_RE.match(value) is not None


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def title_of(content: str) -> str:
    """A thread's title: the start of its first user message, on one line."""
    return " ".join(content.split())[:TITLE_CHARS]


@dataclass(frozen=True, slots=True)
class Turn:
    """A user message and the generation that answers it."""

    id: str
    reply_id: str  # id of the assistant message that answers it
    content: str
    created_at: float
    generation_id: str
    model: str

    def encode(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def decode(cls, raw: Any) -> Turn:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class Reply:
    """The assistant message an ended generation left (partial text kept)."""

    content: str
    status: str
    model: str
    created_at: float
    finished_at: float | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None  # tokens; "cost" (USD) when priced
    error: dict[str, Any] | None = None

    def encode(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def decode(cls, raw: Any) -> Reply:
        return cls(**json.loads(raw))

    @classmethod
    def of_generation(cls, found: tuple[dict[str, str], str] | None) -> Reply:
        """The reply of a generation's (meta, content); a vanished one counts as failed."""
        if found is None:
            return cls("", ev.FAILED, "", streams.now(), streams.now(),
                       error={"code": "gone", "message": "the generation expired"})
        meta, content = found

        def number(name: str) -> float | None:
            return float(meta[name]) if meta.get(name) else None

        return cls(
            content=content,
            status=meta.get("status", ev.FAILED),
            model=meta.get("model", ""),
            created_at=number("started_at") or number("created_at") or 0.0,  # answer began
            finished_at=number("finished_at"),
            finish_reason=meta.get("finish_reason") or None,
            usage=(json.loads(meta["usage"]) or None) if meta.get("usage") else None,
            error=json.loads(meta["error"]) if meta.get("error") else None,
        )


@dataclass(slots=True)
class Thread:
    id: str
    tenant: str
    created_at: float
    updated_at: float
    system: str
    model: str
    metadata: dict[str, str]
    title: str
    active: str | None
    budget: int
    usage: dict[str, int | float]  # token totals, and "cost" (USD) once a priced one ended
    turns: list[Turn] = field(default_factory=list)
    replies: dict[str, Reply] = field(default_factory=dict)
    turn_count: int = 0  # a listing's count; ``turns`` is loaded by load() only


def _thread_of(thread_id: str, raw_meta: dict[Any, Any]) -> Thread:
    meta = {text(k): text(v) for k, v in raw_meta.items()}
    return Thread(
        id=thread_id,
        tenant=meta.get("tenant", ""),
        created_at=float(meta.get("created_at") or 0),
        updated_at=float(meta.get("updated_at") or 0),
        system=meta.get("system", ""),
        model=meta.get("model", ""),
        metadata=json.loads(meta["metadata"]) if meta.get("metadata") else {},
        title=meta.get("title", ""),
        active=meta.get("active") or None,
        budget=int(meta.get("budget") or 0),
        usage=_totals(meta),
    )


def _totals(meta: dict[str, str]) -> dict[str, int | float]:
    """A thread's usage totals: tokens, and cost when any of its generations was priced."""
    totals: dict[str, int | float] = {name: int(meta.get(name) or 0) for name in TOKEN_FIELDS}
    if meta.get("cost_units"):
        totals["cost"] = costs.usd(int(meta["cost_units"]))
    return totals


async def create(
    redis: Redis, tenant: str, *, system: str, model: str, metadata: dict[str, str] | None,
    retention_s: int, thread_id: str | None = None,
) -> Thread:
    """Record a new, empty thread of ``tenant`` and list it; ``thread_id`` names it (a
    Conflict if that thread exists: it is left as it is)."""
    thread_id = thread_id or new_thread_id()
    now = streams.now()
    mapping = {"tenant": tenant, "created_at": str(now), "updated_at": str(now),
               "system": system, "model": model, "metadata": json.dumps(metadata or {}),
               "active": "", "ttl": str(retention_s)}
    fields = [item for pair in mapping.items() for item in pair]
    if not await scripts.CREATE(redis, [keys.thread_meta(thread_id)], retention_s, *fields):
        raise Conflict(f"thread {thread_id} exists", code="thread_exists")
    await thread_index.touch(redis, tenant, thread_id, now, retention_s)
    return _thread_of(thread_id, mapping)


async def load(redis: Redis, thread_id: str) -> Thread | None:
    """A thread with its turns and recorded replies, or None if unknown or expired."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.thread_meta(thread_id))
        pipe.lrange(keys.thread_turns(thread_id), 0, -1)
        pipe.hgetall(keys.thread_replies(thread_id))
        raw_meta, raw_turns, raw_replies = await pipe.execute()
    if not raw_meta:
        return None
    thread = _thread_of(thread_id, raw_meta)
    thread.turns = [Turn.decode(raw) for raw in raw_turns]
    thread.replies = {text(k): Reply.decode(v) for k, v in raw_replies.items() if v}
    return thread


@dataclass(frozen=True, slots=True)
class Claim:
    outcome: str  # start | queued | interrupt | busy | missing
    active: str | None  # the generation that held the slot
    dropped: list[str]  # interrupt: the enqueued generations it replaces


async def claim(
    redis: Redis, thread_id: str, tenant: str, turn: Turn, if_busy: str, *,
    retention_s: int, context_chars: int,
) -> Claim:
    """Append ``turn`` and take the active slot for its generation, or queue it behind
    the active one, in one step. ``busy`` and ``missing`` change nothing."""
    if if_busy not in IF_BUSY:
        raise ValueError(f"if_busy must be one of {IF_BUSY}")
    result = await scripts.CLAIM(
        redis, keys.thread_keys(thread_id), tenant, if_busy, turn.generation_id,
        turn.encode(), turn.created_at, retention_s, title_of(turn.content), context_chars,
    )
    outcome, active, *dropped = (text(v) for v in result)
    if outcome not in ("busy", "missing"):
        await thread_index.touch(redis, tenant, thread_id, turn.created_at, retention_s)
    return Claim(outcome, active or None, dropped)


def build_context(
    system: str, earlier: list[tuple[str, str]], content: str, budget: int
) -> tuple[list[dict[str, str]], int]:
    """The messages of a new turn and how many earlier turns were left out.

    The system prompt and the new user message are always sent; of the earlier
    (question, answer) turns, the newest that fit in ``budget`` characters, in order.
    An empty answer (cancelled before its first word) sends the question alone.
    """
    used = len(system) + len(content)
    kept: list[list[dict[str, str]]] = []
    for question, answer in reversed(earlier):
        used += len(question) + len(answer)
        if used > budget:
            break
        turn = [{"role": "user", "content": question}]
        if answer:
            turn.append({"role": "assistant", "content": answer})
        kept.append(turn)
    head = [{"role": "system", "content": system}] if system else []
    body = [message for turn in reversed(kept) for message in turn]
    return [*head, *body, {"role": "user", "content": content}], len(earlier) - len(kept)


def context_of(thread: Thread, gen_id: str) -> tuple[list[dict[str, str]], int] | None:
    """The context of the turn ``gen_id`` answers: system prompt and every turn before it."""
    for index, turn in enumerate(thread.turns):
        if turn.generation_id == gen_id:
            earlier = [(t.content, r.content if (r := thread.replies.get(t.generation_id)) else "")
                       for t in thread.turns[:index]]
            return build_context(thread.system, earlier, turn.content, thread.budget)
    return None


async def start_turn(redis: Redis, thread_id: str, gen_id: str, start_job: StartJob) -> None:
    """Give the generation that holds the slot its context, then put its job on the queue.

    The context is built now, not when the message was posted, so an enqueued
    message sees the answers before it. Harmless if repeated: the job is deduplicated
    by its id and the generation fenced by its attempt.
    """
    thread = await load(redis, thread_id)
    context = None if thread is None else context_of(thread, gen_id)
    if context is None:
        return  # the thread was deleted meanwhile
    messages, dropped = context
    raw_request, raw_metadata = await awaited(
        redis.hmget(keys.meta(gen_id), ["request", "metadata"]))
    if raw_request is None:
        return
    request = json.loads(raw_request)
    request["messages"] = messages
    metadata = json.loads(raw_metadata) if raw_metadata else {}
    metadata["context_dropped_turns"] = str(dropped)
    if not await scripts.SET_IF_EXISTS(redis, [keys.meta(gen_id)],
                             "request", json.dumps(request), "metadata", json.dumps(metadata)):
        return
    await start_job(gen_id)
    await mark_started(redis, thread_id, gen_id)


def thread_of_generation(metadata: Any) -> str | None:
    """The thread a generation answers in: ``thread_id`` of its metadata (JSON), if any."""
    if not metadata:
        return None
    thread_id = json.loads(metadata).get("thread_id")
    return thread_id if isinstance(thread_id, str) and is_thread_id(thread_id) else None


async def on_generation_end(redis: Redis, gen_id: str, start_job: StartJob) -> None:
    """After a generation's terminal event: keep its text as the assistant message, free
    the thread's slot, and start the next enqueued generation. One HGET for a generation
    outside a thread. Idempotent: a repeated call finds the reply recorded and only
    starts the active generation if its start was never completed."""
    thread_id = thread_of_generation(await awaited(redis.hget(keys.meta(gen_id), "metadata")))
    if thread_id is None:
        return
    found = await streams.read_status(redis, gen_id)
    if found is not None and found[0].get("status") in ev.TERMINAL_STATUSES:
        await settle(redis, thread_id, gen_id, start_job, found)


async def settle(
    redis: Redis, thread_id: str, gen_id: str, start_job: StartJob,
    found: tuple[dict[str, str], str] | None = None,
) -> None:
    """Record the ended ``gen_id`` in its thread and start what comes next."""
    if found is None:
        found = await streams.read_status(redis, gen_id)
    following = await _record(redis, thread_id, gen_id, found)
    while following is not None:
        current = await streams.read_status(redis, following)
        status = current[0].get("status") if current else None
        if status == ev.QUEUED:
            logger.info("thread_id=%s hands over to generation_id=%s", thread_id, following)
            await start_turn(redis, thread_id, following, start_job)
            return
        if status is not None and status not in ev.TERMINAL_STATUSES:
            return  # running: started already
        # Ended while it waited (cancelled by id): nobody else records or counts it.
        if current is not None:
            await count_usage(redis, following, keys.PENDING_TTL_S)
        following = await _record(redis, thread_id, following, current)


async def _record(
    redis: Redis, thread_id: str, gen_id: str, found: tuple[dict[str, str], str] | None
) -> str | None:
    """Record the reply; the generation to start next, if any."""
    reply = Reply.of_generation(found)
    tokens = [int((reply.usage or {}).get(name) or 0) for name in TOKEN_FIELDS]
    cost = costs.units_of(reply.usage)
    result = await scripts.END(redis, keys.thread_keys(thread_id), gen_id,
                               reply.encode(), streams.now(), *tokens,
                               "" if cost is None else cost)
    kind, *rest = (text(v) for v in result)
    if kind == "gone":
        return None
    if kind == "recorded":
        following, tenant, ttl = rest
        await thread_index.touch(redis, tenant, thread_id, streams.now(), int(ttl))
        return following or None
    active, _, _, started = rest  # again: start the active one only if nobody finished that
    return active if active and started != active else None


async def repair(redis: Redis, thread_id: str, active: str, start_job: StartJob) -> bool:
    """Unstick a thread whose active generation ``active`` did not move on: ended without
    handing the slot over (its end hook never ran), or claimed but never started (the
    API process died in between). True if it had ended, so the slot may be free now."""
    found = await streams.read_status(redis, active)
    status = found[0].get("status") if found else None
    if status is None or status in ev.TERMINAL_STATUSES:
        await settle(redis, thread_id, active, start_job, found)
        return True
    if status == ev.QUEUED and found is not None:
        waited = streams.now() - float(found[0].get("created_at") or 0)
        started = await awaited(redis.hget(keys.thread_meta(thread_id), "started"))
        if waited > STUCK_AFTER_S and (started is None or text(started) != active):
            await start_turn(redis, thread_id, active, start_job)
    return False


async def mark_started(redis: Redis, thread_id: str, gen_id: str) -> None:
    """Note that the active generation's job is queued (a retried end hook won't redo it)."""
    await scripts.STARTED(redis, [keys.thread_meta(thread_id)], gen_id)


async def discard_generation(redis: Redis, tenant: str, gen_id: str) -> None:
    """Remove a generation that was recorded but never joined its thread (busy, deleted)."""
    await redis.delete(keys.meta(gen_id), keys.events(gen_id), keys.content(gen_id),
                       keys.cancel(gen_id))
    await limits.release(redis, tenant, gen_id)


async def delete(redis: Redis, thread_id: str, tenant: str) -> list[str] | None:
    """Delete every key of the thread; the generations to cancel (active first), or None
    if the thread is unknown. Its generations keep their own retention."""
    result = await scripts.DELETE(redis, keys.thread_keys(thread_id), tenant)
    await thread_index.remove(redis, tenant, thread_id)
    if result is None:
        return None
    return [text(v) for v in result]


async def list_threads(
    redis: Redis, tenant: str, limit: int, cursor: str | None = None
) -> tuple[list[Thread], str | None]:
    """A page of the tenant's threads, newest activity first, and the next page's cursor
    (ValueError for a malformed one)."""
    found, next_cursor = await thread_index.page(redis, tenant, limit, cursor)
    page = [_thread_of(thread_id, meta) for thread_id, meta, _ in found]
    for thread, (_, _, turns) in zip(page, found, strict=True):
        thread.turn_count = turns
    return page, next_cursor
