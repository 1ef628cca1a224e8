"""The Responses request (api.response_request): input items, tools and text formats in
the Chat Completions shape the providers speak, the earlier turns of a chain, and a 400
that names the parameter for what cannot be carried."""

from __future__ import annotations

import json

import pytest

from tokenrelay.api.openai_errors import OpenAIError
from tokenrelay.api.response_events import fold
from tokenrelay.api.response_request import earlier_turns, parse, to_generation
from tokenrelay.shared import events as ev


def generation(**body: object) -> dict[str, object]:
    created = to_generation(parse(json.dumps(body).encode()), "fake:echo", [])
    return created.model_dump(exclude_none=True)


def test_input_items_become_chat_messages_after_the_instructions() -> None:
    """Messages with text and image parts, a function call and its output, reasoning left out."""
    messages = generation(instructions="be brief", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "look "},
                                     {"type": "input_text", "text": "here"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_image", "image_url": "https://x/y.png"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ])["messages"]
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "look here"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]


def test_tools_tool_choice_and_text_format_take_the_chat_shape() -> None:
    """Flat function tools nest under `function`; text.format becomes response_format."""
    body = generation(input="x", top_p=0.5, tool_choice={"type": "function", "name": "f"},
                      tools=[{"type": "function", "name": "f", "parameters": {"type": "object"},
                              "strict": True}],
                      text={"format": {"type": "json_schema", "name": "n", "schema": {}}})
    assert body["tools"] == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}, "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "n", "schema": {}}}
    assert body["top_p"] == 0.5


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "conversation": "c"}, "conversation"),
    ({"input": [{"type": "item_reference", "id": "i"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
     "input[0].content[0].type"),
    ({"input": "x", "tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
])
def test_what_cannot_be_carried_is_a_400_naming_it(body: dict[str, object], param: str) -> None:
    """Unsupported parameters, item types, part types, tools and values are refused."""
    with pytest.raises(OpenAIError) as refused:
        generation(**body)
    assert refused.value.status == 400 and refused.value.param == param


def test_earlier_turns_are_the_previous_conversation_and_output_without_its_instructions(
) -> None:
    """A chained turn gets the previous input and answer (text and calls), not its
    instructions."""
    head = {"id": "resp_" + "0" * 32, "instructions": "old"}
    previous = fold([
        ev.Event("1-0", ev.STATUS, {"status": "queued", "response": head}),
        ev.Event("1-1", ev.DELTA, {"content": "an answer"}),
        ev.Event("1-2", ev.DELTA, {"tool_calls": [
            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}),
        ev.Event("1-3", ev.DONE, {"finish_reason": "tool_calls"}),
    ])
    request = {"messages": [{"role": "system", "content": "old"},
                            {"role": "user", "content": "a question"}]}
    assert earlier_turns(previous, request) == [
        {"role": "user", "content": "a question"},
        {"role": "assistant", "content": "an answer", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]
