"""Settings: the only place that reads the environment (prefix ``TOKENRELAY_``)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of tokenrelay; the README's configuration table documents each one."""

    model_config = SettingsConfigDict(env_prefix="TOKENRELAY_", extra="ignore",
                                      populate_by_name=True)

    redis_url: str | None = None
    # The arq queue and the control channels (wake-ups, cancels) on their own Redis:
    # arq has no Cluster support, so with REDIS_CLUSTER this must be a plain Redis.
    queue_redis_url: str | None = None
    redis_cluster: bool = False  # REDIS_URL is a node of a Redis Cluster (streams, status)
    api_keys: str | None = None
    signing_secret: str | None = None
    retention_s: int = Field(86400, gt=0)
    max_generation_s: float = Field(600.0, gt=0)
    max_concurrent_per_tenant: int = Field(64, gt=0)
    max_queue_depth: int = Field(10000, gt=0)
    max_body_bytes: int = Field(1_000_000, gt=0)
    # A bare `tokenrelay api` (api/protocol.py): a request's head (request line and
    # headers) in bytes and in time, and the time its body may take after the head.
    request_head_max_bytes: int = Field(64 * 1024, ge=1024)
    request_head_timeout_s: float = Field(10.0, gt=0)
    request_body_timeout_s: float = Field(30.0, gt=0)
    max_tokens_limit: int = Field(32768, gt=0)
    heartbeat_s: float = Field(15.0, gt=0)
    stream_token_ttl_s: int | None = Field(None, gt=0)
    # The fake: provider (demos, tests, benchmarks); turn it off in production, where any
    # tenant could otherwise put text of its choice behind a share link.
    fake_models: bool = True
    fake_tps: float = Field(30.0, gt=0)
    fake_ttft_ms: float = Field(200.0, ge=0)
    openai_base_url: str | None = None
    # The standard OPENAI_API_KEY too, as every OpenAI client reads it.
    openai_api_key: str | None = Field(
        None, validation_alias=AliasChoices("TOKENRELAY_OPENAI_API_KEY", "OPENAI_API_KEY"))
    openai_models: str | None = None  # comma-separated names listed by /v1/models
    anthropic_base_url: str | None = None
    # The SDK's own variable as a fallback, so a machine set up for Claude works as is.
    anthropic_api_key: str | None = Field(
        None, validation_alias=AliasChoices("TOKENRELAY_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")
    )
    anthropic_max_tokens: int = Field(1024, gt=0)  # Anthropic requires max_tokens on every call
    default_model: str = "fake:echo"
    queue_name: str = "tr:queue"
    worker_concurrency: int = Field(100, gt=0)
    hub_history_frames: int = Field(20000, gt=0)
    send_timeout_s: float = Field(30.0, gt=0)
    log_level: str = "INFO"
    log_format: str = Field("text", pattern="^(text|json)$")
    max_attempts: int = Field(3, ge=1)
    worker_grace_s: float = Field(20.0, ge=0)
    max_viewers_per_process: int = Field(20000, gt=0)
    # Threads: kept this long after their last activity (sliding).
    thread_retention_s: int = Field(30 * 86400, gt=0)
    # A generation's context (system prompt and turns, in characters) keeps the newest
    # turns that fit; how many were dropped goes into its metadata.
    thread_context_chars: int = Field(400_000, gt=0)
    thread_max_message_chars: int = Field(100_000, gt=0)  # a thread message's content (422)
    # /v1/ws: subscriptions one socket may hold at once, and the browser origins (besides the
    # API's own) that may open a socket: comma-separated, "*" for any.
    ws_max_subscriptions: int = Field(100, gt=0)
    ws_allowed_origins: str | None = None
    # Presence: each API process writes its viewer counts every PRESENCE_REFRESH_S; a
    # count not refreshed for PRESENCE_TTL_S (a killed process) no longer counts.
    presence_refresh_s: float = Field(1.0, gt=0)
    presence_ttl_s: float = Field(3.0, gt=0)
    # on_disconnect "cancel": how long a generation may have no viewer on any API process.
    abandon_grace_s: float = Field(10.0, gt=0)
    # The Chat Completions facade's on_disconnect when a request does not say (OpenAI's
    # own streams stop when the client goes away).
    openai_on_disconnect: Literal["cancel", "continue"] = "cancel"
    # Model -> [USD per million input tokens, per million output tokens] (JSON).
    prices: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # A worker appends each generation's deltas at most once per this window, consecutive
    # text deltas within it as one event (0: every delta its own event, appended at once).
    coalesce_ms: float = Field(0.0, ge=0, le=1000)

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for pair in value.split(","):
            tenant, sep, key = pair.strip().partition(":")
            if not sep or not tenant or not key:
                raise ValueError("expected comma-separated tenant:key pairs")
        return value

    @field_validator("prices")
    @classmethod
    def _check_prices(cls, value: dict[str, tuple[float, float]]
                      ) -> dict[str, tuple[float, float]]:
        for model, pair in value.items():
            if not model or not all(math.isfinite(p) and p >= 0 for p in pair):
                raise ValueError(f"{model!r}: prices must be two finite numbers >= 0")
        return value

    @model_validator(mode="after")
    def _check_presence(self) -> Settings:
        if self.presence_ttl_s <= self.presence_refresh_s:
            raise ValueError("presence_ttl_s (TOKENRELAY_PRESENCE_TTL_S) must be longer than "
                             "presence_refresh_s (TOKENRELAY_PRESENCE_REFRESH_S)")
        return self

    @property
    def queue_url(self) -> str | None:
        """The queue's Redis: QUEUE_REDIS_URL, else REDIS_URL."""
        return self.queue_redis_url or self.redis_url

    @property
    def queue_shares_redis(self) -> bool:
        """The queue and the streams are one plain Redis (so one MULTI may span both)."""
        return not self.redis_cluster and self.queue_url == self.redis_url

    @property
    def token_ttl_s(self) -> int:
        return self.stream_token_ttl_s or self.retention_s

    def ws_origins(self) -> frozenset[str]:
        """WS_ALLOWED_ORIGINS as a set of lower-case origins (``*`` for any)."""
        raw = self.ws_allowed_origins or ""
        return frozenset(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())

    def tenants_by_key(self) -> dict[str, str]:
        """Map each API key to its tenant; empty when auth is off."""
        if not self.api_keys:
            return {}
        pairs = (p.strip().partition(":") for p in self.api_keys.split(","))
        return {key: tenant for tenant, _, key in pairs}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the environment once; a wrong value raises naming the variable."""
    return Settings()
