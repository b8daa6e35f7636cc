"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.http.errors import error_body, request_id_of
from server.http.openapi import ANY_ROUTE, error_responses
from server.http.schemas import ReadyResponse
from server.http.state import ServerState


def router(state: ServerState) -> APIRouter:
    """The routes, bound to one server's state."""
    router = APIRouter()

    @router.get("/healthz", tags=["ops"], summary="liveness", responses=error_responses(*ANY_ROUTE))
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        tags=["ops"],
        summary="readiness: 200 while a model is loaded and the worker is alive",
        response_model=ReadyResponse,
        responses=error_responses(*ANY_ROUTE),
    )
    async def readyz(request: Request) -> JSONResponse:
        ready = state.ready
        state.metrics.ready.set(1 if ready else 0)
        if not ready:
            msg = f"not ready (state: {state.manager.state}{'; ' + state.manager.error if state.manager.error else ''})"
            return JSONResponse(error_body("not_ready", msg, request_id_of(request)), status_code=503)
        return JSONResponse({"status": "ready", "model_version": state.manager.version})

    @router.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **error_responses(*ANY_ROUTE),
        },
    )
    async def metrics() -> PlainTextResponse:
        state.metrics.ready.set(1 if state.ready else 0)
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
