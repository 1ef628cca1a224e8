"""One attempt of the generation job against a real redis-server, with a scripted provider."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import pytest
from redis.asyncio import Redis

from tokenrelay.cli.redis_server import RedisServer
from tokenrelay.shared import events as ev
from tokenrelay.shared import keys, limits, queue, streams, usage
from tokenrelay.shared.errors import UpstreamError
from tokenrelay.shared.lifecycle import Lifecycle
from tokenrelay.shared.settings import Settings
from tokenrelay.worker.context import WorkerContext
from tokenrelay.worker.control import Control
from tokenrelay.worker.jobs import run_attempt
from tokenrelay.worker.lease import Lease
from tokenrelay.worker.providers import Chunk, Delta, Finish, GenerationRequest, Providers
from tokenrelay.worker.writer import Writer

TENANT = "t1"


@dataclass
class Scripted:
    """A provider that yields ``chunks``, then raises ``error`` or hangs if asked to."""

    chunks: list[Chunk] = field(default_factory=list)
    error: Exception | None = None
    hang: bool = False
    streamed: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        try:
            for chunk in self.chunks:
                yield chunk
            self.streamed.set()
            if self.error is not None:
                raise self.error
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed = True

    async def aclose(self) -> None:
        pass


@dataclass
class Job:
    wc: WorkerContext
    provider: Scripted


@pytest.fixture
async def job(redis_server: RedisServer) -> AsyncIterator[Job]:
    settings = Settings(redis_url=redis_server.url, max_generation_s=0.5, retention_s=60)
    redis = Redis.from_url(redis_server.url)
    pool = await queue.open_queue(queue.redis_settings(redis_server.url), settings.queue_name)
    provider = Scripted()
    ends = Lifecycle(redis, settings.retention_s)
    control = Control(redis, channels=pool)
    lease = Lease(redis, pool, ends, settings.max_attempts)
    wc = WorkerContext(settings=settings, redis=redis, queue=pool,
                       providers=Providers({"test": provider}), control=control,
                       lease=lease, lifecycle=ends, writer=Writer(redis, lease.clock))
    wc.writer.start()
    yield Job(wc, provider)
    await wc.writer.stop()
    await control.stop()
    await pool.aclose()
    await redis.aclose()


async def _queued(redis: Redis, gen_id: str, model: str = "test:m") -> str:
    request = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    await streams.create(redis, streams.NewGeneration(gen_id, TENANT, model, request,
                                                      streams.now()))
    assert await limits.admit(redis, TENANT, gen_id, 10, 600)
    return gen_id


async def _events(redis: Redis, gen_id: str) -> list[ev.Event]:
    return [ev.decode_entry(*e) for e in await streams.read_after(redis, gen_id, None)]


async def _terminal(redis: Redis, gen_id: str) -> ev.Event:
    (terminal,) = [e for e in await _events(redis, gen_id) if e.terminal]
    return terminal


async def test_a_finished_stream_ends_done_and_is_settled(job: Job) -> None:
    """Deltas are appended in order, then ``done``; usage is counted, the slot and the
    worker's hold are released."""
    redis = job.wc.redis
    job.provider.chunks = [Delta("Hel"), Delta("lo"), Finish("stop", {"completion_tokens": 2})]
    gen_id = await _queued(redis, "gen_" + "a" * 32)
    assert await run_attempt(job.wc, gen_id, 1) == ev.DONE
    _, content = await streams.read_status(redis, gen_id)  # type: ignore[misc]
    assert content == "Hello"
    assert (await _terminal(redis, gen_id)).data == {
        "finish_reason": "stop", "usage": {"completion_tokens": 2}}
    assert (await usage.totals(redis, TENANT)).completion_tokens == 2
    assert await redis.zcard(keys.tenant_active(TENANT)) == 0
    assert await redis.hget(keys.RUNNING, gen_id) is None


async def test_a_provider_error_ends_in_an_error_event(job: Job) -> None:
    """A provider's failure becomes one ``error`` event with its code."""
    job.provider.chunks = [Delta("partial")]
    job.provider.error = UpstreamError("upstream went away")
    gen_id = await _queued(job.wc.redis, "gen_" + "b" * 32)
    assert await run_attempt(job.wc, gen_id, 1) == ev.ERROR
    assert (await _terminal(job.wc.redis, gen_id)).data == {
        "code": "upstream_error", "message": "upstream went away", "retryable": True}


async def test_an_unknown_model_ends_in_an_error_event(job: Job) -> None:
    """A model no provider of this worker serves ends the generation with unknown_model."""
    gen_id = await _queued(job.wc.redis, "gen_" + "c" * 32, model="nobody:m")
    assert await run_attempt(job.wc, gen_id, 1) == ev.ERROR
    assert (await _terminal(job.wc.redis, gen_id)).data["code"] == "unknown_model"


async def test_a_stream_over_the_time_limit_ends_in_a_timeout(job: Job) -> None:
    """A provider still streaming at MAX_GENERATION_S is closed; the generation times out."""
    job.provider.hang = True
    gen_id = await _queued(job.wc.redis, "gen_" + "d" * 32)
    assert await run_attempt(job.wc, gen_id, 1) == ev.ERROR
    assert (await _terminal(job.wc.redis, gen_id)).data["code"] == "timeout"
    assert job.provider.closed


async def test_a_cancel_closes_the_provider_and_ends_cancelled(job: Job) -> None:
    """A cancel published mid-stream stops the provider; the stream ends ``cancelled``."""
    job.wc.control.start()
    job.provider.chunks = [Delta("a")]
    job.provider.hang = True
    gen_id = await _queued(job.wc.redis, "gen_" + "e" * 32)
    attempt = asyncio.create_task(run_attempt(job.wc, gen_id, 1))
    await asyncio.wait_for(job.provider.streamed.wait(), 5)
    await job.wc.queue.publish(keys.CANCEL_CHANNEL, gen_id)
    assert await asyncio.wait_for(attempt, 5) == ev.CANCELLED
    assert job.provider.closed
    assert (await _terminal(job.wc.redis, gen_id)).type == ev.CANCELLED


async def test_a_fenced_attempt_stops_without_a_terminal_event(job: Job) -> None:
    """Once a newer attempt started, the old one stops at its next append and ends nothing."""
    redis = job.wc.redis
    gen_id = await _queued(redis, "gen_" + "f" * 32)

    class Takeover(Scripted):
        """Attempt 2 starts (elsewhere) between the first delta and the second."""

        async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
            yield Delta("old")
            assert (await streams.start(redis, gen_id, 2))[0]
            yield Delta("stale")
            yield Finish("stop")

    wc = replace(job.wc, providers=Providers({"test": Takeover()}))
    assert await run_attempt(wc, gen_id, 1) == "fenced"
    assert not [e for e in await _events(redis, gen_id) if e.terminal]
    meta, content = await streams.read_status(redis, gen_id)  # type: ignore[misc]
    assert (meta["status"], meta["attempt"], content) == (ev.RUNNING, "2", "")
    assert await redis.zcard(keys.tenant_active(TENANT)) == 1, "the new attempt holds the slot"


async def test_a_job_for_a_generation_cancelled_while_queued_settles_it(job: Job) -> None:
    """The job of a generation cancelled before it ran does not start it, but counts it."""
    redis = job.wc.redis
    gen_id = await _queued(redis, "gen_" + "0" * 32)
    assert await streams.request_cancel(redis, gen_id, TENANT, 60) == "cancelled"
    assert await run_attempt(job.wc, gen_id, 1) == ev.CANCELLED
    assert (await usage.totals(redis, TENANT)).generations[ev.CANCELLED] == 1
    assert await redis.zcard(keys.tenant_active(TENANT)) == 0


async def test_a_worker_stopping_mid_stream_hands_the_generation_over(job: Job) -> None:
    """A job cancelled by its worker's shutdown queues the next attempt before it stops."""
    job.provider.chunks = [Delta("a")]
    job.provider.hang = True
    gen_id = await _queued(job.wc.redis, "gen_" + "1" * 32)
    attempt = asyncio.create_task(run_attempt(job.wc, gen_id, 1))
    await asyncio.wait_for(job.provider.streamed.wait(), 5)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    deadline = time.monotonic() + 5
    while not await job.wc.queue.zscore(job.wc.settings.queue_name, queue.job_id(gen_id, 2)):
        assert time.monotonic() < deadline, "attempt 2 was not queued"
        await asyncio.sleep(0.01)
    assert not [e for e in await _events(job.wc.redis, gen_id) if e.terminal]


@pytest.mark.parametrize(("first", "expected"), [
    # Retryable, before any token: the next model answers.
    (Scripted(error=UpstreamError.for_status(503, "overloaded")), "Hi there"),
    # Not retryable (a 401 would fail the same way again): no fallback.
    (Scripted(error=UpstreamError.for_status(401, "bad key")), None),
    # After a token: no fallback, which would mix two answers.
    (Scripted(chunks=[Delta("par")], error=UpstreamError("went away")), None),
])
async def test_fallbacks_take_over_only_before_the_first_token(
        job: Job, first: Scripted, expected: str | None) -> None:
    """``model`` "a,b": b answers only when a failed retryably before its first token."""
    second = Scripted(chunks=[Delta("Hi"), Delta(" there"), Finish("stop")])
    wc = replace(job.wc, providers=Providers({"first": first, "second": second}))
    gen_id = await _queued(wc.redis, "gen_" + "f" * 32, model="first:a,second:b")
    outcome = await run_attempt(wc, gen_id, 1)
    _, content = await streams.read_status(wc.redis, gen_id)  # type: ignore[misc]
    if expected is None:
        assert outcome == ev.ERROR and not second.streamed.is_set()
    else:
        assert outcome == ev.DONE and content == expected
