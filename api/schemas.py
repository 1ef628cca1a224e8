"""Request and response bodies of the native API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_MESSAGES = 1000


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class GenerationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, min_length=1, max_length=200,
        description="provider:name; omitted: the server's TOKENRELAY_DEFAULT_MODEL",
    )
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerationCreate:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [m.model_dump(exclude_none=True) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


class GenerationCreated(BaseModel):
    id: str
    status: str
    model: str
    created_at: float
    events_url: str
    stream_token: str


class ErrorInfo(BaseModel):
    code: str
    message: str
    retryable: bool | None = None
    upstream_status: int | None = None  # the upstream's HTTP status, when it answered one


class GenerationStatus(BaseModel):
    id: str
    status: str
    model: str
    content: str
    finish_reason: str | None
    usage: dict[str, int | bool] | None  # "estimated": true when the upstream sent none
    error: ErrorInfo | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    metadata: dict[str, str] | None = None
