"""What is served: the tasks and classes of the served bundle, the versions in the store."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.http.openapi import ANY_ROUTE, error_responses
from server.http.schemas import ModelsResponse, ModelVersion, TaskInfo, TasksResponse
from server.http.state import ServerState


def router(state: ServerState) -> APIRouter:
    """The routes, bound to one server's state."""
    router = APIRouter()

    @router.get(
        "/v1/tasks",
        tags=["models"],
        response_model=TasksResponse,
        summary="tasks and classes of the served bundle",
        responses=error_responses(*ANY_ROUTE),
    )
    async def tasks() -> TasksResponse:
        engine = state.engine()
        infos = [TaskInfo(name=t, index=i, classes=engine.class_names[t]) for i, t in enumerate(engine.tasks)]
        return TasksResponse(model_version=engine.version, gate=engine.has_gate, tasks=infos)

    @router.get(
        "/v1/models",
        tags=["models"],
        response_model=ModelsResponse,
        summary="bundle versions in the store",
        responses=error_responses(*ANY_ROUTE),
    )
    async def models() -> ModelsResponse:
        store = state.manager.store

        def listing() -> ModelsResponse:
            current = store.current_version()
            serving = state.manager.version
            versions = []
            for v in store.versions():
                try:
                    m = store.load(v, verify=False).manifest
                except Exception:  # noqa: BLE001 - a broken version is left out of the listing
                    continue
                versions.append(
                    ModelVersion(
                        version=v,
                        method=m.method,
                        tasks=m.tasks,
                        created_at=m.created_at,
                        current=v == current,
                        serving=v == serving,
                        agreement=m.extra.agreement,
                    )
                )
            return ModelsResponse(current=current, serving=serving, versions=versions)

        return await asyncio.to_thread(listing)

    return router
