"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenrelay.api.deps import State
from tokenrelay.api.metrics import CONTENT_TYPE, Metrics
from tokenrelay.shared import queue, stats

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, state: State) -> Response:
    """Process metrics and deployment-wide generation statistics (Prometheus)."""
    registry: Metrics = request.app.state.metrics
    registry.observe_hub(state.hub)
    snapshot = await stats.snapshot(state.redis)
    snapshot["queue_depth"] = await queue.depth(state.queue)
    return Response(registry.render(snapshot), media_type=CONTENT_TYPE)
