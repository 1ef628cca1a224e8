"""What the jobs of one worker process share, typed: clients, providers, the lease, the end.

arq hands each job a string-keyed ``ctx`` dict; tokenrelay keeps one entry in it,
a ``WorkerContext``, opened at start-up and closed at shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tokenrelay.shared.lifecycle import Lifecycle
from tokenrelay.shared.models import default_provider
from tokenrelay.shared.queue import Queue
from tokenrelay.shared.redis import OUTAGE_RETRY_S, create_redis
from tokenrelay.shared.settings import Settings
from tokenrelay.worker.control import Control
from tokenrelay.worker.lease import Lease
from tokenrelay.worker.providers import Provider, Providers
from tokenrelay.worker.providers.anthropic import AnthropicProvider
from tokenrelay.worker.providers.fake import FakeProvider
from tokenrelay.worker.providers.openai_compat import OpenAICompatProvider
from tokenrelay.worker.writer import Writer

_CTX_KEY = "tokenrelay"


@dataclass(frozen=True, slots=True)
class WorkerContext:
    settings: Settings
    redis: Redis  # the generations' keys (a plain Redis or a Cluster)
    queue: Queue  # the queue's Redis: jobs, and the wake-up and cancel channels
    providers: Providers
    control: Control
    lease: Lease
    lifecycle: Lifecycle
    writer: Writer  # every generation's deltas, appended in batches

    @classmethod
    def open(cls, settings: Settings, redis_url: str, queue: Queue) -> WorkerContext:
        """Make the worker's clients and start its control and lease loops."""
        redis = create_redis(redis_url, "worker", cluster=settings.redis_cluster, patient=True)
        # Everything before the first token and the terminal write ride out a Redis
        # outage: a job that gave up would leave its generation running with no worker.
        lifecycle = Lifecycle(redis, settings.retention_s, retry_s=OUTAGE_RETRY_S, jobs=queue)
        lease = Lease(redis, queue, lifecycle, settings.max_attempts)
        context = cls(
            settings=settings,
            redis=redis,
            queue=queue,
            providers=build_providers(settings),
            # Wake-ups and cancels arrive on the queue's Redis (pub/sub); flags live
            # with the streams.
            control=Control(redis, channels=queue, abandon_grace_s=settings.abandon_grace_s,
                            presence_ttl_s=settings.presence_ttl_s),
            lease=lease,
            lifecycle=lifecycle,
            writer=Writer(redis, lease.clock, cluster=settings.redis_cluster,
                          coalesce_s=settings.coalesce_ms / 1000),
        )
        context.writer.start()
        context.control.start()
        context.lease.start()
        return context

    async def close(self) -> None:
        await self.lease.stop()
        await self.control.stop()
        await self.writer.stop()
        await self.providers.aclose()
        await self.redis.aclose()

    def attach(self, ctx: dict[str, Any]) -> None:
        """Put this context in arq's ``ctx``, where ``of`` finds it."""
        ctx[_CTX_KEY] = self

    @staticmethod
    def of(ctx: dict[str, Any]) -> WorkerContext:
        """The context ``attach`` put in arq's ``ctx``."""
        context: WorkerContext = ctx[_CTX_KEY]
        return context


def build_providers(settings: Settings) -> Providers:
    providers: dict[str, Provider] = {
        "openai": OpenAICompatProvider(settings.openai_base_url, settings.openai_api_key),
        "anthropic": AnthropicProvider.from_settings(settings),
    }
    if settings.fake_models:  # off: a job for a fake: model (queued before) fails unknown_model
        providers["fake"] = FakeProvider(tps=settings.fake_tps,
                                         ttft_s=settings.fake_ttft_ms / 1000)
    return Providers(providers, default=default_provider(settings))
