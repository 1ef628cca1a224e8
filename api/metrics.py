"""Prometheus metrics of an API process, plus the deployment-wide generation statistics.

Process metrics (HTTP answers, errors by code, open streams and viewers, hub
lag) live in a registry made per app, never at import. Generation statistics
(by status, queue wait, time to first token, tokens per second, errors by code)
are recorded by the workers in Redis (``shared.stats``) and rendered at scrape
time, so any API process reports the whole deployment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tokenrelay.shared import stats

if TYPE_CHECKING:
    from tokenrelay.api.hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.responses = Counter("tokenrelay_http_responses", "HTTP responses by status code",
                                 ["status"], registry=self.registry)
        self.errors = Counter("tokenrelay_http_errors", "Error answers by error code",
                              ["code"], registry=self.registry)
        self.created = Counter("tokenrelay_generations_created",
                               "Generations created through this process", registry=self.registry)
        self.hub_lag = Histogram(
            "tokenrelay_hub_lag_seconds",
            "From an event's append in Redis to this process's hub reading it",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.active_streams = Gauge("tokenrelay_active_streams",
                                    "Generations with viewers on this process",
                                    registry=self.registry)
        self.viewers = Gauge("tokenrelay_viewers", "Open SSE connections on this process",
                             registry=self.registry)
        self._snapshot: dict[str, float] = {}
        self.registry.register(_StatsCollector(lambda: self._snapshot))

    def observe_hub(self, hub: Hub) -> None:
        self.active_streams.set(len(hub.channels))
        self.viewers.set(len(hub.connections))

    def render(self, snapshot: dict[str, float]) -> bytes:
        self._snapshot = snapshot
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """Renders the ``tr:stats`` hash (fetched just before) as metric families."""

    def __init__(self, source: object):
        self._source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        snap: dict[str, float] = self._source()  # type: ignore[operator]
        by_status = CounterMetricFamily("tokenrelay_generations_finished",
                                        "Finished generations (all workers) by final status",
                                        labels=["status"])
        errors = CounterMetricFamily("tokenrelay_generation_errors",
                                     "Generations that ended in error (all workers) by code",
                                     labels=["code"])
        for field, value in snap.items():
            if field.startswith("generations:"):
                by_status.add_metric([field.partition(":")[2]], value)
            elif field.startswith("errors:"):
                errors.add_metric([field.partition(":")[2]], value)
        yield by_status
        yield errors
        yield GaugeMetricFamily("tokenrelay_queue_depth", "Jobs waiting in the queue",
                                value=snap.get("queue_depth", 0.0))
        for name, bounds in stats.BUCKETS.items():
            yield _histogram(name, bounds, snap)


def _histogram(name: str, bounds: Iterable[float], snap: dict[str, float]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(f"tokenrelay_{name}", f"{name.replace('_', ' ')} (all workers)")
    buckets = [(f"{b:g}", snap.get(f"{name}:le:{b:g}", 0.0)) for b in bounds]
    count = snap.get(f"{name}:count", 0.0)
    family.add_metric([], buckets + [("+Inf", count)], snap.get(f"{name}:sum", 0.0))
    return family
