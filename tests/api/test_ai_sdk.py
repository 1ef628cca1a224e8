"""The AI SDK chat use cases (api.ai_sdk): which thread a chat id names, and which text of
what the transport posts is the new message."""

from __future__ import annotations

from typing import Any

import pytest

from tokenrelay.api.ai_sdk import ChatRequest, chat_thread_id, new_text
from tokenrelay.shared.errors import BadRequest, ValidationFailed
from tokenrelay.shared.threads import is_thread_id


def request(*messages: dict[str, Any], **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"id": "chat", "messages": list(messages), **fields})


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"id": "u", "role": "user", "parts": list(parts)}


def test_a_chat_id_names_one_thread_per_tenant() -> None:
    """The same chat id is the same thread for one tenant and another for another tenant."""
    ours = chat_thread_id("acme", "chat-1")
    assert is_thread_id(ours)
    assert chat_thread_id("acme", "chat-1") == ours
    assert chat_thread_id("globex", "chat-1") != ours
    assert chat_thread_id("acme", "chat-2") != ours


def test_the_new_message_is_the_text_of_the_last_one() -> None:
    """Earlier messages are the thread's; the last one's text parts are joined; other
    parts and the app's own body fields are ignored."""
    body = request(user({"type": "text", "text": "old"}),
                   {"role": "assistant", "parts": [{"type": "text", "text": "reply"}]},
                   user({"type": "step-start"}, {"type": "text", "text": "new "},
                        {"type": "text", "text": "one"}),
                   appField={"kept": "out"}, model="fake:echo")
    assert new_text(body) == "new one"


@pytest.mark.parametrize(("body", "error"), [
    (request(user({"type": "text", "text": "hi"}), trigger="regenerate-message"), BadRequest),
    (request({"role": "assistant", "parts": [{"type": "text", "text": "hi"}]}), ValidationFailed),
    (request(user({"type": "file", "url": "data:,x", "mediaType": "text/plain"})), BadRequest),
    (request(user({"type": "text", "text": " \n"})), ValidationFailed),
])
def test_what_cannot_be_a_thread_message_is_refused(body: ChatRequest,
                                                    error: type[Exception]) -> None:
    """Regenerate, a last message not the user's, files, or no text: a clear 4xx."""
    with pytest.raises(error):
        new_text(body)
