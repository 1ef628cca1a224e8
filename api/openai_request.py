"""The OpenAI Chat Completions request: parsed, checked, and turned into a generation.

Parameters that change the answer and that tokenrelay cannot carry yet are
refused with a 400 naming them, never dropped silently; parameters that only
label or route a request at OpenAI (``user``, ``store``...) are accepted and
ignored, as is any parameter sent as ``null``.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenrelay.api.openai_errors import OpenAIError
from tokenrelay.api.schemas import (
    MAX_MESSAGES,
    GenerationCreate,
    Message,
    OnDisconnect,
    Sampling,
)
from tokenrelay.shared.models import check_model
from tokenrelay.shared.settings import Settings

M = TypeVar("M", bound=BaseModel)

# Accepted, no effect on the answer.
IGNORED = frozenset(
    {"user", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
     "safety_identifier"}
)

# Accepted only with the value that asks for nothing we would not do anyway.
NO_OP_VALUES: dict[str, tuple[Any, str]] = {
    "n": (1, "tokenrelay returns one choice: 'n' must be 1"),
    "logprobs": (False, "tokenrelay does not return logprobs"),
    "parallel_tool_calls": (True, "tokenrelay cannot restrict parallel tool calls"),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(Sampling):
    """The subset of OpenAI's request body that tokenrelay carries to the provider."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    # tokenrelay's own (the SDK's extra_body): "continue" keeps a generation going after
    # the client leaves, to resume it by its X-Generation-Id; default OPENAI_ON_DISCONNECT.
    on_disconnect: OnDisconnect | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse(raw: bytes) -> ChatCompletionRequest:
    """The request in ``raw``, or an OpenAIError (400) that names the offending parameter."""
    return read_body(ChatCompletionRequest, raw, IGNORED, NO_OP_VALUES)


def read_body(model: type[M], raw: bytes, ignored: frozenset[str],
              no_op: dict[str, tuple[Any, str]]) -> M:
    """The JSON object in ``raw`` (see :func:`body_object`) as a ``model``, or an OpenAIError
    (400) that names the offending parameter: how both OpenAI doors read a request."""
    try:
        return model.model_validate(body_object(raw, ignored, no_op))
    except ValidationError as exc:
        raise invalid(exc) from None


def body_object(raw: bytes, ignored: frozenset[str],
                no_op: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """The JSON object in ``raw`` without the ``ignored`` parameters, those sent as null,
    and those of ``no_op`` (400 unless given their one allowed value)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "invalid_request", "the request body must be a JSON object")
    data = {k: v for k, v in data.items() if v is not None and k not in ignored}
    for name, (allowed, why) in no_op.items():
        if name in data and data.pop(name) != allowed:
            raise OpenAIError(400, "unsupported_value", why, param=name)
    return data


def invalid(exc: ValidationError) -> OpenAIError:
    err = exc.errors()[0]
    param = ".".join(str(part) for part in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        return OpenAIError(
            400, "unsupported_parameter",
            f"tokenrelay does not support the '{param}' parameter", param=param,
        )
    if err["type"] == "missing":
        return OpenAIError(400, "missing_required_parameter",
                           f"missing required parameter: '{param}'", param=param)
    return OpenAIError(400, "invalid_value", f"invalid '{param}': {err['msg']}", param=param)


def to_generation(request: ChatCompletionRequest, settings: Settings) -> GenerationCreate:
    """The native generation this request asks for; OpenAIError if it can't be served here."""
    problem = check_model(request.model, settings)
    if problem is not None:
        raise OpenAIError(404, "model_not_found", problem, param="model")
    limit = request.token_limit
    if limit is not None and limit > settings.max_tokens_limit:
        name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise OpenAIError(400, "invalid_value",
                          f"'{name}' is at most {settings.max_tokens_limit}", param=name)
    try:
        return GenerationCreate(
            model=request.model,
            messages=request.messages,
            max_tokens=limit,
            temperature=request.temperature,
            metadata=request.metadata,
            tools=request.tools,
            tool_choice=request.tool_choice,
            on_disconnect=request.on_disconnect or settings.openai_on_disconnect,
            **request.sampling(),
        )
    except ValidationError as exc:
        raise invalid(exc) from None
