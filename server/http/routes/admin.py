"""Admin (bearer token): start a merge job, follow it."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from server.http.auth import require_admin
from server.http.openapi import ANY_ROUTE, MERGE_BODY, error_responses
from server.http.requests import read_merge_request
from server.http.schemas import MergeJobView
from server.http.state import ServerState


def router(state: ServerState) -> APIRouter:
    """The routes, bound to one server's state."""
    router = APIRouter()

    def admin(request: Request) -> None:
        require_admin(request, state.settings)

    @router.post(
        "/v1/merge",
        tags=["admin"],
        status_code=202,
        response_model=MergeJobView,
        summary="start a merge job (admin)",
        openapi_extra=MERGE_BODY,
        responses=error_responses(400, 401, 403, 409, 413, 415, 422, 503),
        dependencies=[Depends(admin)],
    )
    async def merge(request: Request) -> dict[str, Any]:
        job = await asyncio.to_thread(state.jobs.submit, await read_merge_request(request))
        return job.as_dict()

    @router.get(
        "/v1/merge/{job_id}",
        tags=["admin"],
        response_model=MergeJobView,
        summary="a merge job's state (admin)",
        dependencies=[Depends(admin)],
        responses=error_responses(401, 403, 404, *ANY_ROUTE),
    )
    async def merge_job(job_id: str) -> dict[str, Any]:
        return state.jobs.get(job_id).as_dict()

    router.add_api_route(
        "/merge", merge, methods=["POST"], status_code=202, include_in_schema=False, dependencies=[Depends(admin)]
    )
    router.add_api_route(
        "/merge/{job_id}", merge_job, methods=["GET"], include_in_schema=False, dependencies=[Depends(admin)]
    )
    return router
