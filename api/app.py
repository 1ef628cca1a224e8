"""The FastAPI app factory; clients are opened in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI

from tokenrelay.api.deps import AppState
from tokenrelay.api.errors import add_exception_handlers
from tokenrelay.api.fastpath import EventsFastPath
from tokenrelay.api.hub import Hub
from tokenrelay.api.metrics import Metrics
from tokenrelay.api.middleware import BodyLimit, RequestContext
from tokenrelay.api.openai_errors import add_openai_errors
from tokenrelay.api.presence import Presence
from tokenrelay.api.readers import create_reader
from tokenrelay.api.routes import (
    ai_sdk,
    generations,
    health,
    metrics,
    openai_compat,
    responses,
    threads,
    usage,
    web,
    ws,
)
from tokenrelay.api.routes.docs import add_docs
from tokenrelay.api.sse import Connections
from tokenrelay.api.tokens import StreamTokens, load_secret
from tokenrelay.shared.logs import configure as configure_logging
from tokenrelay.shared.queue import open_queue, redis_settings
from tokenrelay.shared.redis import create_redis
from tokenrelay.shared.runtime import freeze_startup_heap
from tokenrelay.shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def _drain_on_exit_signal(connections: Connections) -> None:
    """On SIGTERM/SIGINT, end open streams with a reconnect hint, then let uvicorn shut down.

    uvicorn waits for open connections before it stops, and event streams never end by
    themselves; without this a rolling restart would hold every viewer until
    ``timeout_graceful_shutdown`` and then cut them. The handler wraps uvicorn's own
    (installed before the lifespan starts) and is scoped to this app's run.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(connections.drain)
            if callable(previous):
                previous(signum, frame)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (an app run inside tests): nothing to wrap
            return


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise RuntimeError("TOKENRELAY_REDIS_URL is not set")
        configure_logging(settings.log_level, settings.log_format)
        redis = create_redis(settings.redis_url, "api", cluster=settings.redis_cluster)
        queue = await open_queue(  # the queue and the control channels: never a Cluster
            redis_settings(settings.queue_url or settings.redis_url), settings.queue_name
        )
        tenants = settings.tenants_by_key()
        if not tenants:
            logger.warning("TOKENRELAY_API_KEYS is unset: authentication is OFF")
        secret = await load_secret(redis, settings.signing_secret)
        reader = create_reader(redis, settings.redis_url, cluster=settings.redis_cluster,
                               on_lag=app.state.metrics.hub_lag.observe)
        hub = Hub(redis, reader, settings.hub_history_frames,
                  heartbeat_s=settings.heartbeat_s, send_timeout_s=settings.send_timeout_s)
        presence = Presence(redis, hub.channels, refresh_s=settings.presence_refresh_s,
                            ttl_s=settings.presence_ttl_s, grace_s=settings.abandon_grace_s)
        hub.on_viewers = presence.mark
        hub.start()
        presence.start()
        _drain_on_exit_signal(hub.connections)
        app.state.tr = AppState(
            settings=settings,
            redis=redis,
            queue=queue,
            hub=hub,
            tokens=StreamTokens(secret, settings.token_ttl_s),
            tenants_by_key=tenants,
            metrics=app.state.metrics,
        )
        freeze_startup_heap()
        try:
            yield
        finally:
            await hub.stop()
            await presence.stop()
            await queue.aclose()
            await redis.aclose()

    app = FastAPI(
        title="tokenrelay",
        version="0.1.0",
        description="Resumable, shareable LLM streams: queue → worker → Redis Stream → SSE.",
        lifespan=lifespan,
        docs_url=None,  # served by add_docs, from local files instead of a CDN
        redoc_url=None,
    )
    add_docs(app)
    errors = add_exception_handlers(app)
    add_openai_errors(app, errors)  # OpenAI's error shape on the OpenAI paths
    app.include_router(generations.router)
    app.include_router(threads.router)
    app.include_router(health.router)
    app.include_router(web.router)
    app.include_router(openai_compat.router)
    app.include_router(responses.router)
    app.include_router(usage.router)
    app.include_router(metrics.router)
    app.include_router(ai_sdk.router)
    app.state.metrics = Metrics()
    app.add_middleware(EventsFastPath)  # innermost: SSE viewers skip the router's layers
    app.add_middleware(ws.WebSocketDoor)  # /v1/ws below the router too
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, errors=errors)
    app.add_middleware(RequestContext, metrics=app.state.metrics)
    return app
