"""The web page at ``/``: static HTML, CSS and a few ES modules from ``api/static/``, no build step.

The HTML carries one value of the server's: the default model, the model field's value.

Only the files listed here are served (no directory walking), with a strict
Content-Security-Policy so that model output can never run as script even if a
rendering bug let markup through, and ``Referrer-Policy: no-referrer`` because a
viewer page's URL carries a stream token.
"""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from tokenrelay.api.deps import State
from tokenrelay.shared.errors import NotFound

STATIC = Path(__file__).resolve().parent.parent / "static"

_JS = "text/javascript; charset=utf-8"
# name -> media type; anything else under /static/ is a 404.
_ASSETS = {
    "app.css": "text/css; charset=utf-8",
    **{f"{module}.js": _JS for module in ("app", "api", "answer", "chat", "markdown", "stream",
                                           "view")},
}

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # Small files that change with each release: revalidate instead of guessing an age.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=1)
def _page() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


@router.get("/")
async def index(state: State) -> HTMLResponse:
    """The chat page (``/?thread=ID`` reopens a thread; ``/?view=ID&token=T`` is the read-only
    live view of a shared thread or answer)."""
    default_model = html.escape(state.settings.default_model, quote=True)
    return HTMLResponse(_page().replace("{{default_model}}", default_model), headers=_HEADERS)


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    """One of the page's own assets."""
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFound("no such file")
    return FileResponse(STATIC / name, media_type=media_type, headers=_HEADERS)
