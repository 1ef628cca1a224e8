"""The FastAPI app factory; clients are opened in the lifespan, never at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import RedisSettings, create_pool
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import AppState
from api.errors import add_exception_handlers, error_response
from api.hub import Hub
from api.routes import generations, health, web
from api.tokens import StreamTokens, load_secret
from shared.redis import create_redis
from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)


class BodyLimit:
    """Answers 413 for bodies over the limit, whether Content-Length says so or the bytes do."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "payload_too_large", f"request body over {self.limit} bytes"
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise RuntimeError("TOKENRELAY_REDIS_URL is not set")
        redis = create_redis(settings.redis_url, "api")
        queue = await create_pool(
            RedisSettings.from_dsn(settings.redis_url), default_queue_name=settings.queue_name
        )
        tenants = settings.tenants_by_key()
        if not tenants:
            logger.warning("TOKENRELAY_API_KEYS is unset: authentication is OFF")
        secret = await load_secret(redis, settings.signing_secret)
        hub = Hub(redis, settings.redis_url, settings.hub_history_frames)
        hub.start()
        app.state.tr = AppState(
            settings=settings,
            redis=redis,
            queue=queue,
            hub=hub,
            tokens=StreamTokens(secret, settings.token_ttl_s),
            tenants_by_key=tenants,
        )
        try:
            yield
        finally:
            await hub.stop()
            await queue.aclose()
            await redis.aclose()

    app = FastAPI(
        title="tokenrelay",
        version="0.1.0",
        description="Resumable, shareable LLM streams: queue → worker → Redis Stream → SSE.",
        lifespan=lifespan,
    )
    add_exception_handlers(app)
    app.include_router(generations.router)
    app.include_router(health.router)
    app.include_router(web.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
