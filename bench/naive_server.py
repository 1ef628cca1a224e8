"""The naive design, for comparison only: every viewer runs its own blocking XREAD loop.

    python bench/naive_server.py --port P --redis-url redis://127.0.0.1:PORT/0

What many first versions look like: FastAPI + sse-starlette, one async generator
per connection, and in it a Redis connection of its own that replays the stream
and then blocks on ``XREAD`` for the next entries; each event is formatted for
each viewer. It serves ``GET /v1/generations/{id}/events`` in tokenrelay's wire
format from tokenrelay's Redis, so the load client measures both designs on the
same generation with the same code. It checks the generation exists (HGETALL +
GET, as tokenrelay's route does) so that the Redis command counts compare alike.
Never used by tokenrelay itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn  # noqa: E402
from fastapi import FastAPI, HTTPException  # noqa: E402
from redis.asyncio import BlockingConnectionPool, Redis  # noqa: E402
from sse_starlette import EventSourceResponse, ServerSentEvent  # noqa: E402

from tokenrelay.shared import events as ev  # noqa: E402
from tokenrelay.shared import keys  # noqa: E402

BLOCK_MS = 5000


def create_app(redis_url: str) -> FastAPI:
    state: dict[str, Redis] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One connection per blocked viewer: the pool must be allowed to grow to N.
        pool = BlockingConnectionPool.from_url(redis_url, max_connections=20000, timeout=30,
                                               socket_timeout=BLOCK_MS / 1000 + 5)
        state["redis"] = Redis(connection_pool=pool)
        yield
        await state["redis"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/generations/{gen_id}/events")
    async def events(gen_id: str) -> EventSourceResponse:
        redis = state["redis"]
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.meta(gen_id))
            pipe.get(keys.content(gen_id))
            meta, _ = await pipe.execute()
        if not meta:
            raise HTTPException(404)
        return EventSourceResponse(_follow(redis, gen_id), ping=15, send_timeout=30, sep="\n",
                                   ping_message_factory=lambda: ServerSentEvent(comment="ping",
                                                                                sep="\n"))

    return app


async def _follow(redis: Redis, gen_id: str) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(retry=1000, sep="\n")
    key = keys.events(gen_id)
    last = "0-0"
    while True:
        response = await redis.xread({key: last}, count=100, block=BLOCK_MS)
        for _, entries in response or []:
            for entry_id, fields in entries:
                event = ev.decode_entry(entry_id, fields)
                last = event.id
                yield ServerSentEvent(id=event.id, event=event.type, data=ev.dumps(event.data),
                                      sep="\n")
                if event.terminal:
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description="naive SSE server (benchmark comparison)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.redis_url), host="127.0.0.1", port=args.port,
                log_level="warning", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
