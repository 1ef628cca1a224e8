"""The built-in ``fake:`` provider, for demos, tests and benchmarks: no network, no key.

``fake:echo`` streams the last user message back word by word (each word with the
whitespace before it, so newlines and indentation come back as sent), ``fake:lorem``
exactly ``max_tokens`` (default 64) filler words, ``fake:error`` a few words and
then an ``upstream_error``. The first word comes ``ttft_s`` after the call, then
one every ``1 / tps`` seconds, on an absolute schedule so the rate does not drift.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

from tokenrelay.shared.errors import UnknownModel, UpstreamError
from tokenrelay.worker.providers.base import Chunk, Delta, Finish, GenerationRequest

LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat"
).split()
DEFAULT_MAX_TOKENS = 64
ERROR_AFTER_WORDS = 3
WORD = re.compile(r"\s*\S+")  # a word and the whitespace before it


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def count_words(messages: list[dict[str, Any]]) -> int:
    return sum(len(_text_of(m).split()) for m in messages)


def _echo_pieces(text: str) -> list[str]:
    """``text`` cut into words, each with the whitespace before it; they join back to ``text``."""
    pieces = WORD.findall(text)
    if pieces:
        pieces[-1] += text[sum(map(len, pieces)):]  # trailing whitespace rides on the last word
    return pieces


class FakeProvider:
    def __init__(self, tps: float, ttft_s: float):
        self.tps = tps
        self.ttft_s = ttft_s

    async def aclose(self) -> None:
        return None

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.model == "echo":
            users = [m for m in request.messages if m.get("role") == "user"]
            return self._words(request, _echo_pieces(_text_of(users[-1]) if users else ""),
                               natural_end="stop", spaced=False)
        if request.model == "lorem":
            limit = request.max_tokens or DEFAULT_MAX_TOKENS
            return self._words(request, itertools.islice(itertools.cycle(LOREM), limit), "length")
        if request.model == "error":
            return self._words(request, LOREM[:ERROR_AFTER_WORDS], natural_end=None)
        raise UnknownModel(f"unknown model 'fake:{request.model}' (echo, lorem, error)")

    async def _words(
        self, request: GenerationRequest, words: Iterable[str], natural_end: str | None,
        spaced: bool = True,
    ) -> AsyncIterator[Chunk]:
        """One delta per word; ``spaced``: a space goes between words (else they carry theirs)."""
        loop = asyncio.get_running_loop()
        start = loop.time() + self.ttft_s
        limit = request.max_tokens
        emitted = 0
        finish_reason = natural_end
        for word in words:
            if limit is not None and emitted >= limit:
                finish_reason = "length"
                break
            delay = start + emitted / self.tps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            yield Delta(content=word if emitted == 0 or not spaced else " " + word)
            emitted += 1
        if finish_reason is None:
            raise UpstreamError("fake:error failed on purpose after a few words")
        prompt = count_words(request.messages)
        usage = {"prompt_tokens": prompt, "completion_tokens": emitted,
                 "total_tokens": prompt + emitted}
        yield Finish(finish_reason, usage)
