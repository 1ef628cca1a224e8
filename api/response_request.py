"""The OpenAI Responses request: parsed, checked, and turned into a generation.

``input`` (a string, or message / function_call / function_call_output items),
``instructions``, ``tools`` (function tools), ``tool_choice`` and ``text.format`` become
the Chat Completions messages and parameters that the providers already speak. As in
:mod:`tokenrelay.api.openai_request`, a parameter that would change the answer and
cannot be carried is refused with a 400 naming it; one that only labels or stores a
request at OpenAI is accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenrelay.api.openai_errors import OpenAIError
from tokenrelay.api.openai_request import IGNORED, invalid, read_body
from tokenrelay.api.response_events import CALL, MESSAGE, ResponseState
from tokenrelay.api.schemas import GenerationCreate
from tokenrelay.shared.models import check_model
from tokenrelay.shared.settings import Settings

# Accepted, no effect on the answer (``store``: every response is kept for RETENTION_S).
RESPONSES_IGNORED = IGNORED | {"include", "stream_options"}
NO_OP_VALUES: dict[str, tuple[Any, str]] = {
    "parallel_tool_calls": (True, "tokenrelay cannot restrict parallel tool calls"),
    "truncation": ("disabled", "tokenrelay does not truncate the input: 'truncation' must "
                               "be 'disabled'"),
}
# Tuples, not sets: a client's value may be unhashable (a list), and must get a 400.
_ROLES = ("assistant", "developer", "system", "user")
_TEXT_PARTS = ("input_text", "output_text", "text")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """The subset of OpenAI's ``POST /v1/responses`` body that tokenrelay carries."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, min_length=1, max_length=200)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    stream: bool = False
    background: bool = False
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    text: TextOptions | None = None


def parse(raw: bytes) -> ResponsesRequest:
    """The request in ``raw``, or an OpenAIError (400) that names the offending parameter."""
    return read_body(ResponsesRequest, raw, RESPONSES_IGNORED, NO_OP_VALUES)


def _bad(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, code, message, param=param)


def _text_of(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise _bad(param, f"'{param}' must be a string")
    return value


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """A message's content: a string, or parts (text and images) in the Chat shape."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(param, f"'{param}' must be a string or a non-empty list of parts")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": _text_of(part.get("text"), f"{where}.text")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if isinstance(part.get("detail"), str):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _bad(f"{where}.type", f"tokenrelay supports text parts and input_image "
                       f"parts with an image_url, not {kind!r}", "unsupported_value")
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)  # every upstream takes a string
    return parts


def _tool_call(item: dict[str, Any], param: str) -> dict[str, Any]:
    return {"id": _text_of(item.get("call_id"), f"{param}.call_id"), "type": "function",
            "function": {"name": _text_of(item.get("name"), f"{param}.name"),
                         "arguments": _text_of(item.get("arguments"), f"{param}.arguments")}}


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as Chat Completions messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        kind = item.get("type", MESSAGE if "role" in item else None)
        if kind == MESSAGE:
            role = item.get("role")
            if role not in _ROLES:
                raise _bad(f"{param}.role", f"'{param}.role' must be one of "
                           f"{', '.join(_ROLES)}")
            messages.append({"role": role, "content": _content(item.get("content"),
                                                               f"{param}.content")})
        elif kind == CALL:
            call = _tool_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # the same assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({
                "role": "tool", "tool_call_id": _text_of(item.get("call_id"), f"{param}.call_id"),
                "content": _content(output, f"{param}.output")})
        elif kind == "reasoning":
            continue  # a model's own reasoning does not go back upstream
        else:
            raise _bad(f"{param}.type", "tokenrelay supports message, function_call and "
                       f"function_call_output input items, not {kind!r}", "unsupported_value")
    return messages


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses function tools (flat) as Chat Completions tools (nested ``function``)."""
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise _bad(f"tools[{i}].type", "tokenrelay supports function tools only",
                       "unsupported_value")
        function = {"name": _text_of(tool.get("name"), f"tools[{i}].name")}
        if not isinstance(tool.get("parameters", {}), dict | None):
            raise _bad(f"tools[{i}].parameters", "a tool's 'parameters' is a JSON schema object")
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise _bad("tool_choice", "'tool_choice' must be auto, none, required, or "
                       "{\"type\": \"function\", \"name\": ...}")
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise _bad("tool_choice", "tokenrelay supports a function tool_choice only: "
                   "{\"type\": \"function\", \"name\": ...}", "unsupported_value")
    return {"type": "function", "function": {"name": choice["name"]}}


def response_format(text: TextOptions | None) -> dict[str, Any] | None:
    """``text.format`` as the Chat Completions ``response_format``."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.name is None or fmt.schema_ is None:
        raise _bad("text.format", "a json_schema format needs its 'name' and 'schema'")
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def earlier_turns(previous: ResponseState, request: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation a previous response continued (``request``: the job request it
    was generated from) and its own output, as Chat messages. Its instructions are not
    carried over, as OpenAI documents."""
    messages = list(request.get("messages") or [])
    if previous.head is not None and previous.head.get("instructions") is not None:
        messages = messages[1:]
    text, calls = "", []
    for item in previous.output:
        if item.kind == MESSAGE:
            text += item.text
        elif item.kind == CALL:
            calls.append({"id": item.call_id, "type": "function",
                          "function": {"name": item.name, "arguments": item.text}})
    if text or calls:
        turn: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            turn["tool_calls"] = calls
        messages.append(turn)
    return messages


def resolve_model(request: ResponsesRequest, settings: Settings) -> str:
    """The model that will answer; OpenAIError if this deployment cannot serve it."""
    model = request.model or settings.default_model
    problem = check_model(model, settings)
    if problem is not None:
        raise OpenAIError(404, "model_not_found", problem, param="model")
    limit = request.max_output_tokens
    if limit is not None and limit > settings.max_tokens_limit:
        raise _bad("max_output_tokens", f"'max_output_tokens' is at most "
                   f"{settings.max_tokens_limit}")
    return model


def to_generation(request: ResponsesRequest, model: str,
                  earlier: list[dict[str, Any]]) -> GenerationCreate:
    """The native generation: instructions first, the earlier turns, then ``input``."""
    messages = [{"role": "system", "content": request.instructions}] if (
        request.instructions is not None) else []
    messages += earlier + input_messages(request.input)
    extra: dict[str, Any] = {}
    if request.top_p is not None:
        extra["top_p"] = request.top_p
    fmt = response_format(request.text)
    if fmt is not None:
        extra["response_format"] = fmt
    try:
        return GenerationCreate.model_validate({
            "model": model,
            "messages": messages,
            "max_tokens": request.max_output_tokens,
            "temperature": request.temperature,
            "metadata": request.metadata,
            "tools": chat_tools(request.tools) if request.tools else None,
            "tool_choice": (chat_tool_choice(request.tool_choice)
                            if request.tool_choice is not None else None),
            **extra,
        })
    except ValidationError as exc:
        raise invalid(exc) from None


def head(request: ResponsesRequest, response_id: str, model: str,
         created_at: float) -> dict[str, Any]:
    """The response's fixed fields, stored with its first event (the fold starts from it)."""
    fmt = request.text.format if request.text is not None else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "background": request.background,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "metadata": request.metadata or {},
        "model": model,
        "parallel_tool_calls": True,
        "previous_response_id": request.previous_response_id,
        "store": True,
        "temperature": request.temperature,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                 if fmt is not None else {"type": "text"}},
        "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
        "tools": request.tools or [],
        "top_p": request.top_p,
        "truncation": "disabled",
    }
