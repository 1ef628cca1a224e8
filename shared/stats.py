"""Deployment-wide generation statistics, kept in one Redis hash and rendered by ``/metrics``.

Workers record each finished generation (status, error code, queue wait, time
to first token, tokens per second) with a few pipelined HINCRBYs; any API
process renders the hash as Prometheus counters and histograms, so the figures
cover every worker, not one process.
"""

from __future__ import annotations

from redis.asyncio import Redis

from tokenrelay.shared import keys
from tokenrelay.shared.redis import awaited, text

BUCKETS: dict[str, tuple[float, ...]] = {
    "queue_wait_seconds": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                           10, 30),
    "time_to_first_token_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    "tokens_per_second": (1, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000),
}


def _observe(pipe: object, name: str, value: float) -> None:
    for bound in BUCKETS[name]:
        if value <= bound:
            pipe.hincrby(keys.STATS, f"{name}:le:{bound:g}", 1)  # type: ignore[attr-defined]
    pipe.hincrbyfloat(keys.STATS, f"{name}:sum", value)  # type: ignore[attr-defined]
    pipe.hincrby(keys.STATS, f"{name}:count", 1)  # type: ignore[attr-defined]


async def record(
    redis: Redis,
    status: str,
    *,
    error_code: str | None = None,
    queue_wait_s: float | None = None,
    ttft_s: float | None = None,
    tokens_per_s: float | None = None,
) -> None:
    """Count one finished generation (called once, after its terminal event was written)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(keys.STATS, f"generations:{status}", 1)
        if error_code:
            pipe.hincrby(keys.STATS, f"errors:{error_code}", 1)
        for name, value in (("queue_wait_seconds", queue_wait_s),
                            ("time_to_first_token_seconds", ttft_s),
                            ("tokens_per_second", tokens_per_s)):
            if value is not None and value >= 0:
                _observe(pipe, name, value)
        await pipe.execute()


async def snapshot(redis: Redis) -> dict[str, float]:
    raw = await awaited(redis.hgetall(keys.STATS))
    return {text(k): float(v) for k, v in raw.items()}
