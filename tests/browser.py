"""Browser tests' harness: Debian's chromium driven by Playwright (never a downloaded browser).

Tests that use it skip when chromium or playwright is missing, except in CI, which installs
chromium: there a skip would hide that the browser tests never ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tests.stack import ROOT

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Route

CHROMIUM = Path(os.environ.get("TOKENRELAY_CHROMIUM", "/usr/bin/chromium"))
# The flags this machine needs: no sandbox as root, and no background traffic to the outside.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SHOTS = ROOT / "build" / "screenshots"
TIMEOUT_MS = 20_000


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package 'playwright' is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)"
    return None


MISSING = _browser_missing()
if MISSING and os.environ.get("CI"):
    raise RuntimeError(f"browser test cannot run in CI: {MISSING}")


class Pages:
    """Fresh browser contexts (one per person), each page checked for script errors at the end."""

    def __init__(self, browser: Browser, name: str):
        self.browser = browser
        self.name = name
        self.contexts: list[BrowserContext] = []
        self.errors: list[str] = []
        self.blocked: list[str] = []

    def new(self, url: str, offline: bool = False, init_script: str | None = None) -> Page:
        """A page in a fresh context. ``init_script`` runs before the page's own scripts on
        every load; ``offline``: every request to a host other than 127.0.0.1 is aborted (and
        listed in ``self.blocked``), as on a machine without internet."""
        context = self.browser.new_context(viewport={"width": 1100, "height": 900})
        self.contexts.append(context)
        if init_script:
            context.add_init_script(init_script)
        if offline:
            context.route("**/*", self._local_only)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.goto(url)
        return page

    def _local_only(self, route: Route) -> None:
        url = route.request.url
        if url.startswith("data:") or urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def shot(self, page: Page, label: str) -> Path:
        """A screenshot of the window, in build/screenshots/."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{self.name}-{label}.png"
        page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        for context in self.contexts:
            context.close()
