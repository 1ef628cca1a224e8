"""Request and response bodies of the native API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_MESSAGES = 1000
MAX_STOP = 4

# What happens when nobody watches any more: go on, or cancel after a grace.
OnDisconnect = Literal["continue", "cancel"]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' goes with type 'json_schema', and only with it")
        return self


class Sampling(BaseModel):
    """The standard sampling parameters, as OpenAI documents them; both doors take them
    and the upstream gets them as given (a provider that cannot honour one says so in
    the README)."""

    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="up to 4 sequences where the upstream stops")
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _stop_sequences(self) -> Sampling:
        if isinstance(self.stop, list) and not 1 <= len(self.stop) <= MAX_STOP:
            raise ValueError(f"'stop' takes 1 to {MAX_STOP} sequences")
        if self.stop == "":
            raise ValueError("'stop' must not be empty")
        return self

    def sampling(self) -> dict[str, Any]:
        """The parameters given, as the upstream request carries them."""
        return self.model_dump(include=set(Sampling.model_fields), exclude_none=True)


class GenerationCreate(Sampling):
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
    viewers: int = Field(0, description="viewers connected to it on any API process")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    on_disconnect: OnDisconnect = Field(
        "continue", description="cancel: stop once no viewer has been connected for "
                                "TOKENRELAY_ABANDON_GRACE_S")

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
    # "estimated": true when the upstream sent none; "cost" in USD when PRICES prices the model
    usage: dict[str, int | float | bool] | None
    error: ErrorInfo | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    metadata: dict[str, str] | None = None
    viewers: int = Field(0, description="viewers connected to it on any API process")
