"""Read-only stream tokens: signed, expiring, scoped to one generation.

Format ``<gen_id>.<expires_unix>.<signature>``, the signature an HMAC-SHA256 of
the first two parts with the deployment's signing secret. A token grants
reading that generation's status and events and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from redis.asyncio import Redis

from tokenrelay.shared import keys


class StreamTokens:
    def __init__(self, secret: bytes, ttl_s: int):
        self._secret = secret
        self._ttl_s = ttl_s

    def issue(self, gen_id: str, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self._ttl_s)
        body = f"{gen_id}.{expires}"
        return f"{body}.{self._sign(body)}"

    def verify(self, token: str, now: float | None = None) -> str | None:
        """The generation id the token grants, or None if tampered with or expired."""
        body, _, signature = token.rpartition(".")
        gen_id, _, expires = body.partition(".")
        if not gen_id or not (expires.isascii() and expires.isdigit()):
            return None
        # As bytes: compare_digest refuses a str holding anything but ASCII (a client's
        # '%C3%A9' would otherwise raise), and no valid signature holds one.
        if not hmac.compare_digest(self._sign(body).encode(),
                                   signature.encode("utf-8", "surrogateescape")):
            return None
        if int(expires) < (now if now is not None else time.time()):
            return None
        return gen_id

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def load_secret(redis: Redis, configured: str | None) -> bytes:
    """The configured secret, else one shared through Redis so all API processes agree."""
    if configured:
        return configured.encode()
    await redis.set(keys.SIGNING_SECRET, secrets.token_urlsafe(32), nx=True)
    value = await redis.get(keys.SIGNING_SECRET)
    return value if isinstance(value, bytes) else str(value).encode()
