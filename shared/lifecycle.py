"""The end of a generation: its one terminal event, and all that follows from it.

``Lifecycle.end`` is how a queued generation ends (a worker's job, the reaper,
an API that could not queue it): it writes the terminal event, fenced by the
attempt, and only if that write was the one, does the bookkeeping once: the
tenant's usage, the concurrency slot, the deployment statistics. ``settle`` is
the part of the bookkeeping that is safe to repeat; it also runs for a
generation that ended without a worker (cancelled while queued). Whatever else
must happen when a generation ends (a chat thread storing the answer as its
assistant message, then starting its next queued message) belongs in
``settle``, where every ending passes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay.shared import events as ev
from tokenrelay.shared import limits, queue, stats, streams, threads, usage
from tokenrelay.shared.redis import retrying

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ending:
    """How a generation ends: its terminal event, and the status fields it sets."""

    event_type: str
    data: dict[str, Any]
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return ev.STATUS_AFTER[self.event_type]


def done(finish_reason: str, usage_: dict[str, Any] | None) -> Ending:
    """The provider finished: ``done`` with its finish reason and token usage."""
    return Ending(ev.DONE, {"finish_reason": finish_reason, "usage": usage_},
                  {"finish_reason": finish_reason, "usage": json.dumps(usage_ or {})})


def cancelled(reason: str | None = None) -> Ending:
    """A cancel was requested while the generation ran; ``reason`` "abandoned": by the
    worker, after no viewer had been connected for the grace (on_disconnect: cancel)."""
    return Ending(ev.CANCELLED, {"reason": reason} if reason else {})


def failed(code: str, message: str, *, retryable: bool, **extra: Any) -> Ending:
    """An ``error`` event; its data is also the status's ``error`` field. ``extra``: more
    fields of the error (e.g. ``upstream_status``)."""
    data = {"code": code, "message": message, "retryable": retryable, **extra}
    return Ending(ev.ERROR, data, {"error": ev.dumps(data)})


@dataclass
class Timing:
    """When a generation was created, started and wrote its first delta (for statistics)."""

    created: float
    started: float
    first_delta: float | None = None


class Lifecycle:
    """Ends generations on ``redis``; terminal writes are retried for ``retry_s`` while
    Redis is unreachable (a worker must not leave a generation running unattended)."""

    def __init__(self, redis: Redis, retention_s: int, retry_s: float = 0.0,
                 jobs: queue.Queue | None = None) -> None:
        self._redis = redis
        self._retention_s = retention_s
        self._retry_s = retry_s
        self._jobs = jobs  # where a thread's next enqueued generation is started

    async def end(self, gen_id: str, attempt: int | None, ending: Ending,
                  timing: Timing | None = None, content: str | None = None) -> bool:
        """Write the terminal event and do the bookkeeping; False (and nothing done) if the
        generation had ended already or a newer attempt owns it. ``attempt`` None: any.
        ``content``: the answer's text as streamed, if the caller has it.

        Shielded from cancellation: a job cancelled mid-write still leaves exactly one
        terminal event, counted once.
        """
        return await asyncio.shield(self._end(gen_id, attempt, ending, timing, content))

    async def _end(self, gen_id: str, attempt: int | None, ending: Ending,
                   timing: Timing | None, content: str | None) -> bool:
        written = await retrying(lambda: streams.finish(
            self._redis, gen_id, attempt, ending.event_type, ending.data, self._retention_s,
            ending.fields, content,
        ), gen_id, self._retry_s)
        if written:
            await self.settle(gen_id)
            await self._record_stats(ending, timing)
        return written

    async def settle(self, gen_id: str) -> None:
        """The bookkeeping of an ended generation that is safe to repeat: count it in its
        tenant's usage (once, however often called), free its concurrency slot, and, for
        a thread's generation, keep the answer as the assistant message and start the
        thread's next enqueued message."""
        await usage.record(self._redis, gen_id, self._retention_s)
        await limits.release_generation(self._redis, gen_id)
        if self._jobs is not None:
            await threads.on_generation_end(self._redis, gen_id, self._start_job)

    async def _start_job(self, gen_id: str) -> None:
        assert self._jobs is not None
        await queue.enqueue_attempt(self._jobs, gen_id, 1)

    async def _record_stats(self, ending: Ending, timing: Timing | None) -> None:
        """Count the ending in the deployment's statistics: once, right after the write."""
        try:
            await stats.record(self._redis, ending.status,
                               error_code=ending.data.get("code") if ending.event_type == ev.ERROR
                               else None,
                               **_durations(ending, timing))
        except (RedisError, OSError) as exc:  # statistics must never fail a generation
            logger.warning("could not record statistics: %s", exc)


def _durations(ending: Ending, timing: Timing | None) -> dict[str, float | None]:
    """Queue wait, time to first token and tokens per second, where ``timing`` tells them."""
    if timing is None:
        return {}
    completion = ((ending.data.get("usage") or {}).get("completion_tokens")
                  if ending.event_type == ev.DONE else None)
    streamed_s = time.time() - timing.first_delta if timing.first_delta else 0.0
    return {
        "queue_wait_s": timing.started - timing.created if timing.started else None,
        "ttft_s": timing.first_delta - timing.created if timing.first_delta else None,
        "tokens_per_s": completion / streamed_s if completion and streamed_s > 0 else None,
    }
