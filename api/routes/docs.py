"""``/docs`` (Swagger UI) and ``/redoc`` from files a Python package ships, not from a CDN.

FastAPI's own pages load their JavaScript and CSS from a CDN, so on a machine without
internet access ``/docs`` is a blank page. The ``fastapi-offline`` wheel carries the
same files (a current Swagger UI 5, which reads OpenAPI 3.1, and ReDoc); we serve them
from it with FastAPI's own page builders.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/docs-assets"
REDOC_URL = "/docs-redoc.standalone.js"
# ReDoc's side menu shows Redocly's logo from their CDN whatever the options say; our copy of
# the script shows no image there, so the page asks nothing of the internet.
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
NO_LOGO = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


def offline_redoc() -> bytes:
    """The ReDoc bundle with its one hard-coded CDN address replaced by an empty image."""
    script = (ASSETS / "redoc.standalone.js").read_text(encoding="utf-8")
    if REDOCLY_LOGO not in script:  # a new fastapi-offline: the test of /redoc will tell
        return script.encode()
    return script.replace(REDOCLY_LOGO, NO_LOGO).encode()


def add_docs(app: FastAPI) -> None:
    """Serve ``/docs``, ``/redoc`` and their assets; create ``app`` with ``docs_url=None``
    and ``redoc_url=None`` so FastAPI's CDN pages are not there too."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    redoc_script = offline_redoc()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(redoc_script, media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API reference",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            # No badge from validator.swagger.io: nothing on this page leaves the server.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API reference",
            redoc_js_url=f"{root}{REDOC_URL}",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
