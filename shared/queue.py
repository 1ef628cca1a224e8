"""The job queue: the one module that knows how arq stores, names and claims a job.

An arq job is a record at ``arq:job:<id>`` (the serialised call) and a member of
the queue's sorted set, scored by when it is due (ms); a worker claims it by
setting ``arq:in-progress:<id>``. tokenrelay writes and claims jobs itself, in
fewer round trips than arq's own calls (the queue hop), and keeps those writes
in step with what arq's worker reads here. The queue's Redis is arq's client
(``Queue``): a plain Redis, never a Cluster, which also carries the wake-up and
cancel channels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio.client import Pipeline
from redis.asyncio.sentinel import SentinelConnectionPool

from tokenrelay.shared import keys
from tokenrelay.shared.redis import Script

Queue = ArqRedis

# The job function's name: what the worker registers and every job calls.
JOB_NAME = "generate"

SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379
# Under Sentinel, how long a create waits for a replica to hold its job (WAIT), so a
# failover right after the create does not lose the job with the old primary.
REPLICA_WAIT_MS = 500

# A reservation's job becomes due this long after a create that died before writing it.
RESERVATION_MS = 60_000


def job_id(gen_id: str, attempt: int) -> str:
    """The job id of an attempt: the first is the generation id, later ones are suffixed."""
    return gen_id if attempt == 1 else f"{gen_id}:a{attempt}"


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings for the queue's Redis at ``url``.

    ``redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER[/DB]`` names the Sentinels that
    watch the queue's primary instead: every client asks them where the primary is, and
    asks again after a failover.
    """
    if not url.startswith(SENTINEL_SCHEME):
        return RedisSettings.from_dsn(url)
    hosts, _, path = url.removeprefix(SENTINEL_SCHEME).partition("/")
    master, _, database = path.partition("/")
    sentinels: list[tuple[str, int]] = []
    for entry in filter(None, hosts.split(",")):
        host, _, port = entry.rpartition(":")
        sentinels.append((host, int(port)) if host else (entry, SENTINEL_PORT))
    if not sentinels or not master:
        raise ValueError(f"a Sentinel URL is {SENTINEL_SCHEME}HOST:PORT[,HOST:PORT…]/MASTER[/DB],"
                         f" got {url!r}")
    return RedisSettings(host=sentinels, sentinel=True, sentinel_master=master,
                         database=int(database or 0))


def replicated(queue: Queue) -> bool:
    """Whether the queue's Redis is a Sentinel-watched primary (its writes are replicated)."""
    return isinstance(queue.connection_pool, SentinelConnectionPool)


async def open_queue(connection: RedisSettings | None, queue_name: str) -> Queue:
    """A client of the queue's Redis whose jobs go to ``queue_name``."""
    return await create_pool(connection, default_queue_name=queue_name)


@dataclass(frozen=True, slots=True)
class Job:
    """A generation's first job as arq stores it, to be written inside another MULTI."""

    queue: str
    gen_id: str
    payload: bytes
    ttl_ms: int
    score: int


def first_job(queue: Queue, gen_id: str) -> Job:
    """The job of a new generation, as ``ArqRedis.enqueue_job`` would write it.

    arq's duplicate check (WATCH / EXISTS) is moot for a fresh random id.
    """
    now_ms = int(time.time() * 1000)
    payload = serialize_job(JOB_NAME, (gen_id,), {}, None, now_ms,
                            serializer=queue.job_serializer)
    return Job(queue=queue.default_queue_name, gen_id=gen_id, payload=payload,
               ttl_ms=queue.expires_extra_ms, score=now_ms)


def add(pipe: Pipeline, job: Job) -> None:
    """Queue ``job`` (it re-scores its reservation to now) and wake the workers, as part
    of ``pipe``'s transaction: one round trip for the record, the entry and the wake-up."""
    pipe.psetex(job_key_prefix + job.gen_id, job.ttl_ms, job.payload)
    pipe.zadd(job.queue, {job.gen_id: job.score})
    pipe.publish(keys.WAKE_CHANNEL, job.gen_id)


async def enqueue(queue: Queue, job: Job) -> None:
    """Queue ``job`` on the queue's own Redis, in a transaction of its own."""
    async with queue.pipeline(transaction=True) as pipe:
        add(pipe, job)
        await pipe.execute()
    if replicated(queue):
        # Acknowledged once a replica has it too (or after REPLICA_WAIT_MS without one:
        # a lone primary keeps accepting work).
        await queue.execute_command("WAIT", 1, REPLICA_WAIT_MS)  # type: ignore[no-untyped-call]


async def enqueue_attempt(queue: Queue, gen_id: str, attempt: int) -> None:
    """Queue ``attempt`` (2, 3, …) of a generation and wake the workers."""
    await queue.enqueue_job(JOB_NAME, gen_id, attempt, _job_id=job_id(gen_id, attempt))
    await queue.publish(keys.WAKE_CHANNEL, gen_id)  # workers listen on the queue's Redis


# Take a place in the queue if it holds fewer than ARGV[1] jobs, in one step, so a burst
# of concurrent creates cannot all pass a separate count. The place is the job's own
# entry, scored in the future so no worker takes it before the job is written (which
# re-scores it to now); one whose create died is dropped by arq as expired.
# KEYS: queue ; ARGV: limit gen_id score
_RESERVE = Script("""
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
""")


async def drop(queue: Queue, gen_id: str, attempt: int) -> None:
    """Forget a lost attempt's job: its queue entry (which counts against the queue's
    limit), record and claim. Without this a killed worker's job stays queued until its
    claim expires (the job timeout: minutes) and a worker runs it only to find it stale."""
    job = job_id(gen_id, attempt)
    async with queue.pipeline(transaction=False) as pipe:
        pipe.zrem(queue.default_queue_name, job)
        pipe.delete(job_key_prefix + job, in_progress_key_prefix + job)
        await pipe.execute()


async def reserve_slot(queue: Queue, gen_id: str, limit: int) -> bool:
    """Hold a place for ``gen_id``'s job (queued or running jobs count); False if full."""
    score = int(time.time() * 1000) + RESERVATION_MS
    reserved = await _RESERVE(queue, [queue.default_queue_name], str(limit), gen_id, str(score))
    return bool(reserved)


async def release_slot(queue: Queue, gen_id: str) -> None:
    """Give a reserved place back (the create did not happen)."""
    await queue.zrem(queue.default_queue_name, gen_id)


async def depth(queue: Queue) -> int:
    """Jobs in the queue (waiting, reserved or running)."""
    count: int = await queue.zcard(queue.default_queue_name)
    return count


# Claim a queued job (KEYS: in-progress key, queue; ARGV: job id, now ms, timeout ms):
# its score if it was free, queued and due, else nil. arq's rule, in one step.
_CLAIM = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
return score
""")


async def claim(queue: Queue, queue_name: str, job_id_: str, timeout_s: float) -> int | None:
    """Claim a job for this worker, as arq's worker does before running it (one script
    instead of WATCH / EXISTS / ZSCORE / MULTI); its score (when it was due, ms), or None
    when it runs elsewhere, has finished, or is not due yet."""
    score = await _CLAIM(queue, [in_progress_key_prefix + job_id_, queue_name], job_id_,
                         str(int(time.time() * 1000)), str(int(timeout_s * 1000)))
    return None if score is None else int(float(score))
