"""Generation ids: ``gen_``, the creation time, and 128 random bits, all in hex.

    gen_ 0192f3a4b5c6 3f9c…(32 hex)
         └ ms since the epoch (12 hex digits), └ 128 random bits: unguessable

The time lets the API tell a generation whose retention is over (410 ``gone``)
from an id that never existed (404) once its keys are gone, without keeping
anything longer. Ids made before the time was added (``gen_`` + 32 hex) stay
valid; having no time, they are 404 once missing.
"""

from __future__ import annotations

import re
import secrets
import time

PATTERN = r"gen_(?:[0-9a-f]{12})?[0-9a-f]{32}"
_GEN_ID_RE = re.compile(PATTERN)
_TIME_HEX = 12


def new_generation_id(now: float | None = None) -> str:
    ms = int((time.time() if now is None else now) * 1000)
    return f"gen_{ms:0{_TIME_HEX}x}{secrets.token_hex(16)}"


def is_generation_id(value: str) -> bool:
    return _GEN_ID_RE.fullmatch(value) is not None  # ("$" would let a trailing "\n" in)


def created_ms(gen_id: str) -> int | None:
    """When the generation was created (ms since the epoch); None for an old-format id."""
    if not is_generation_id(gen_id) or len(gen_id) != 4 + _TIME_HEX + 32:
        return None
    return int(gen_id[4 : 4 + _TIME_HEX], 16)


def past_retention(gen_id: str, retention_s: float, now: float | None = None) -> bool:
    """Whether even a generation finished at its creation would have expired by now.

    Only meaningful for an id whose keys are gone: a generation keeps its keys for
    ``retention_s`` after it ends, which is never before it was created. A forged id
    with an old time is also "past": the answer depends on nothing but the id.
    """
    created = created_ms(gen_id)
    if created is None:
        return False
    return created / 1000 + retention_s < (time.time() if now is None else now)
