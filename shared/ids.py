"""Generation ids: ``gen_`` and 128 random bits in hex, unguessable and easy to validate."""

from __future__ import annotations

import re
import secrets

_GEN_ID_RE = re.compile(r"^gen_[0-9a-f]{32}$")


def new_generation_id() -> str:
    return f"gen_{secrets.token_hex(16)}"


def is_generation_id(value: str) -> bool:
    return _GEN_ID_RE.match(value) is not None
