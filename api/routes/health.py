"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from redis.exceptions import RedisError

from tokenrelay.api.deps import State
from tokenrelay.shared.errors import Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unreachable"}})
async def readyz(state: State) -> dict[str, str]:
    """Redis is reachable (and the queue's Redis, when it is another one)."""
    try:
        await state.redis.ping()
        if not state.settings.queue_shares_redis:
            await state.queue.ping()
    except (RedisError, OSError) as exc:
        raise Unavailable(f"redis unreachable: {exc}", retry_after=2) from exc
    return {"status": "ready"}
