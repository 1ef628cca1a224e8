"""The API's dependencies: app state and the caller's identity, one Annotated alias each.

They are ``async def`` although none of them awaits: FastAPI runs a plain
``def`` dependency in a worker thread, a hop that cost every request (and every
viewer's reconnect) a thread hand-off each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from tokenrelay.api.hub import Hub
from tokenrelay.api.metrics import Metrics
from tokenrelay.api.tokens import StreamTokens
from tokenrelay.shared.errors import NotFound, Unauthorized
from tokenrelay.shared.ids import is_generation_id
from tokenrelay.shared.queue import Queue
from tokenrelay.shared.settings import Settings

DEFAULT_TENANT = "default"


@dataclass
class AppState:
    settings: Settings
    redis: Redis
    queue: Queue
    hub: Hub
    tokens: StreamTokens
    tenants_by_key: dict[str, str]
    metrics: Metrics


@dataclass(frozen=True)
class Principal:
    """Who is asking: a tenant, or a stream token scoped to one generation."""

    tenant: str | None
    generation: str | None = None  # set for stream tokens: the one generation they may read

    def may_read(self, gen_id: str, owner: str) -> bool:
        if self.generation is not None:
            return self.generation == gen_id
        return self.tenant == owner


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tr
    return state


State = Annotated[AppState, Depends(get_state)]


def bearer_tenant(request: HTTPConnection, state: AppState) -> str | None:
    """The tenant of the request's ``Authorization: Bearer`` key (the default one when auth
    is off); None without a valid key. For WebSocket handshakes too."""
    if not state.tenants_by_key:
        return DEFAULT_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        return None
    return state.tenants_by_key.get(key.strip())


async def get_tenant(request: Request, state: State) -> str:
    tenant = bearer_tenant(request, state)
    if tenant is None:
        raise Unauthorized("missing or invalid API key (Authorization: Bearer KEY)")
    return tenant


async def get_reader(
    request: Request,
    state: State,
    token: Annotated[str | None, Query(description="read-only stream token")] = None,
) -> Principal:
    tenant = bearer_tenant(request, state)
    if tenant is not None:
        return Principal(tenant)
    if token:
        gen_id = state.tokens.verify(token)
        if gen_id is None:
            raise Unauthorized("invalid or expired stream token")
        return Principal(None, gen_id)
    raise Unauthorized("missing or invalid API key or stream token")


Tenant = Annotated[str, Depends(get_tenant)]
Reader = Annotated[Principal, Depends(get_reader)]


async def generation_id(gen_id: str) -> str:
    if not is_generation_id(gen_id):
        raise NotFound("no such generation")
    return gen_id


GenerationId = Annotated[str, Depends(generation_id)]
