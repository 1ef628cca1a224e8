"""Idempotency-Key: the same key, from the same tenant, for the same request, is one generation.

    key ──▶ tr:idem:{tenant}:KEY = {"id", "model", "created_at", "fp"}   (TTL: RETENTION_S)

``fp`` fingerprints what the key was first used for: a SHA-256 of the endpoint, the
tenant and the request in canonical form (the parsed body, defaults resolved, keys
sorted, absent and null alike). A retry of that request gets the same generation;
the key with another request, or on another endpoint, is refused with 422
``idempotency_key_reused`` (400 in OpenAI's shape on the facade), and nothing is
created. Records written before the fingerprint existed match any request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tokenrelay.shared import keys
from tokenrelay.shared.errors import BadRequest, ValidationFailed

MAX_KEY_CHARS = 200


@dataclass(frozen=True)
class Earlier:
    """The generation an Idempotency-Key was first used for."""

    id: str
    model: str
    created_at: float


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_CHARS:
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters")


def fingerprint(endpoint: str, tenant: str, request: dict[str, Any]) -> str:
    """SHA-256 of the endpoint, the tenant and the request in canonical JSON."""
    canonical = json.dumps([endpoint, tenant, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def find(redis: Redis, tenant: str, key: str, fp: str) -> Earlier | None:
    """The generation made earlier with ``key`` for this request; 422 if for another one."""
    raw = await redis.get(keys.idempotency(tenant, key))
    if raw is None:
        return None
    record = json.loads(raw)
    if record.get("fp", fp) != fp:
        raise ValidationFailed(
            "this Idempotency-Key was used for a different request (another body or "
            "endpoint); use a new key for a new request", code="idempotency_key_reused")
    return Earlier(record["id"], record["model"], record["created_at"])


async def claim(redis: Redis, tenant: str, key: str, fp: str, made: Earlier,
                ttl_s: int) -> Earlier | None:
    """Tie ``key`` to ``made``; if another request holds it already, that one's generation
    (or 422, as :func:`find`, if it was for another request)."""
    record = json.dumps({"id": made.id, "model": made.model, "created_at": made.created_at,
                         "fp": fp})
    if await redis.set(keys.idempotency(tenant, key), record, nx=True, ex=ttl_s):
        return None
    return await find(redis, tenant, key, fp)
