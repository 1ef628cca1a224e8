"""The frameworks people already hold, against the Chat Completions facade, unchanged:
LangChain's ChatOpenAI (langchain-openai) and LiteLLM, streamed and not, tools included
(real processes; the model server is tests/fake_upstream.py behind the openai: provider)."""

from __future__ import annotations

import json

import litellm
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.fake_upstream import TOOL_CALLS
from tests.stack import Stack

pytestmark = pytest.mark.slow  # starts real processes

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def stack(upstream_stack: Stack) -> Stack:
    return upstream_stack


def _chat(stack: Stack, model: str = "fake:echo") -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{stack.url}/v1", api_key="unused",  # type: ignore[arg-type]
                      model=model, max_retries=0)


def test_langchain_invoke_and_stream(stack: Stack) -> None:
    chat = _chat(stack)
    answer = chat.invoke(PROMPT)
    assert answer.content == PROMPT
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] > 0
    streamed = "".join(str(chunk.content) for chunk in chat.stream(PROMPT))
    assert streamed == PROMPT


async def test_langchain_async_stream(stack: Stack) -> None:
    parts = [str(chunk.content) async for chunk in _chat(stack).astream(PROMPT)]
    assert "".join(parts) == PROMPT and len([p for p in parts if p]) > 1


@pytest.mark.parametrize("model", ["tools", "tools-repeated"])
def test_langchain_bind_tools_gets_whole_tool_calls(stack: Stack, model: str) -> None:
    """The upstream streams two tool calls in fragments (repeating the name in each, as
    llama.cpp does, for tools-repeated); LangChain gets them whole, names and arguments
    intact, not streamed and streamed."""

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The weather in a city."""
        return "sunny"

    @tool
    def get_time(tz: str) -> str:
        """The time in a time zone."""
        return "noon"

    chat = _chat(stack, f"openai:{model}").bind_tools([get_weather, get_time])
    expected = [(call["name"], call["arguments"]) for call in TOOL_CALLS]
    answer = chat.invoke("weather and time in Paris?")
    assert [(c["name"], json.dumps(c["args"])) for c in answer.tool_calls] == [
        (name, json.dumps(json.loads(arguments))) for name, arguments in expected]
    merged = None
    for chunk in chat.stream("weather and time in Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    assert [c["name"] for c in merged.tool_calls] == [name for name, _ in expected]


# LiteLLM's own pydantic models warn as it loads them (ReadOnly TypedDict items).
LITELLM_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning:pydantic")


@LITELLM_WARNINGS
def test_litellm_completion_streamed_and_not(stack: Stack) -> None:
    kwargs = {"model": "openai/fake:echo", "api_base": f"{stack.url}/v1", "api_key": "unused",
              "messages": [{"role": "user", "content": PROMPT}]}
    answer = litellm.completion(**kwargs)
    assert answer.choices[0].message.content == PROMPT
    assert answer.usage.completion_tokens > 0
    stream = litellm.completion(**kwargs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == PROMPT


@LITELLM_WARNINGS
async def test_litellm_async_stream(stack: Stack) -> None:
    stream = await litellm.acompletion(
        model="openai/fake:echo", api_base=f"{stack.url}/v1", api_key="unused",
        messages=[{"role": "user", "content": PROMPT}], stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == PROMPT
