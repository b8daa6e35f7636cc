"""The FastAPI application factory: thin routes over the batcher, the engine and merge jobs.

Request path (hooks in the LitServe sense): **decode** (read the body, validate,
decode and preprocess images in a thread pool; :mod:`server.http.requests`) ->
**batch** (the dynamic batcher queues images for the single inference worker) ->
**predict** (the engine routes, groups by task and classifies) -> **encode**
(top-k, labels, version, timings). Routes live in :mod:`server.http.routes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from server.http.codec import configure_pillow
from server.http.errors import APIError, install_error_handlers
from server.http.middleware import ServingMiddleware
from server.http.openapi import served_openapi
from server.http.routes import admin, inference, models, ops, pages, v2
from server.http.settings import ServerSettings
from server.http.state import ServerState

#: endpoints served by the middleware's fast path (they take the request and path parameters only)
FAST_ENDPOINTS = ("classify", "infer")


def create_app(settings: ServerSettings | None = None, progress: bool = False) -> FastAPI:
    """A vitmerge server app; its lifespan loads (or merges) the model and runs the batcher."""
    settings = settings or ServerSettings()
    configure_pillow(settings.max_image_pixels)
    state = ServerState(settings, progress)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    from server import __version__

    app = FastAPI(
        title="vitmerge",
        version=__version__,
        description=(
            "Merged multi-task Vision Transformers: classify with the gate or a given task; merge and hot-swap bundles."
        ),
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc with assets served here (routes.pages): no CDN
        redoc_url=None,
    )
    app.state.vitmerge = state
    app.openapi = served_openapi(app, state)  # type: ignore[method-assign]  # the served bundle's tasks, versions
    install_error_handlers(app)
    fast: list[APIRoute] = []  # filled below, read by the middleware (built at the first request)
    app.add_middleware(ServingMiddleware, state=state, fast=fast)
    for group in (ops, models, inference, admin, v2, pages):
        app.include_router(group.router(state))
    fast += [r for r in api_routes(app.routes) if r.endpoint.__name__ in FAST_ENDPOINTS]
    app.state.fast_routes = fast
    return app


def api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """Every endpoint route, routers included in routers too (FastAPI keeps an included router as one entry)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from api_routes(included.routes)


__all__ = ["APIError", "ServerState", "create_app"]
