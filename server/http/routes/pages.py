"""Pages for people: the playground at ``/`` and the API docs (Swagger UI at ``/docs``, ReDoc at ``/redoc``).

Every asset is served by this server under ``/static/``: the playground's own files
(:data:`PLAYGROUND_DIR`, package data) and Swagger UI / ReDoc from the pinned ``fastapi-offline``
package, so the pages work on a machine with no network. No page links outside the server.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from server.http.errors import NotFound
from server.http.state import ServerState

#: the playground's page, script and style sheet (no build step)
PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "static"
PLAYGROUND_FILES = ("playground.js", "playground.css")
DOCS_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
#: Swagger UI asks validator.swagger.io about the spec unless told not to
SWAGGER_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
#: external URLs the pinned bundles load by themselves, replaced by a file of ours as they are served
#: (ReDoc's sidebar shows Redocly's logo from its CDN, with no option to turn it off)
REWRITES: dict[str, tuple[bytes, bytes]] = {
    "redoc.standalone.js": (b"https://cdn.redoc.ly/redoc/logo-mini.svg", b"static/favicon.png"),
}


def docs_assets_dir() -> Path:
    """Swagger UI's and ReDoc's files as the ``fastapi-offline`` package ships them."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("fastapi-offline is missing (a pinned dependency): pip install -e . or make setup")
    return Path(spec.origin).parent / "static"


def static_files(playground: bool) -> dict[str, Path]:
    """The files ``/static/<name>`` serves: the docs' assets, and the playground's when it is on."""
    docs = docs_assets_dir()
    files = {name: docs / name for name in DOCS_FILES}
    if playground:
        files.update({name: PLAYGROUND_DIR / name for name in PLAYGROUND_FILES})
    return files


@functools.cache
def _rewritten(path: Path, old: bytes, new: bytes) -> bytes:
    """``path``'s bytes with ``old`` replaced by ``new`` (read once)."""
    return path.read_bytes().replace(old, new)


def _root(request: Request) -> str:
    """The path prefix the server is mounted under (a proxy's ``root_path``), '' by default."""
    return str(request.scope.get("root_path") or "").rstrip("/")


def router(state: ServerState) -> APIRouter:
    """The routes, bound to one server's state."""
    router = APIRouter(include_in_schema=False)
    files = static_files(state.settings.playground)

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        path = files.get(name)
        if path is None:
            raise NotFound(f"no static file '{name}'")
        if name in REWRITES:
            return Response(_rewritten(path, *REWRITES[name]), media_type="text/javascript")
        return FileResponse(path)

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        app, root = request.app, _root(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}/static/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/favicon.png",
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
            swagger_ui_parameters={**SWAGGER_PARAMETERS, **(app.swagger_ui_parameters or {})},
        )

    @router.get("/docs/oauth2-redirect")
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        app, root = request.app, _root(request)
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API reference",
            redoc_js_url=f"{root}/static/redoc.standalone.js",
            redoc_favicon_url=f"{root}/static/favicon.png",
            with_google_fonts=False,
        )

    if state.settings.playground:

        @router.get("/")
        async def playground() -> FileResponse:
            return FileResponse(PLAYGROUND_DIR / "playground.html")

    return router
