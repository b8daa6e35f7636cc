"""``POST /v1/classify``: decode -> batch -> predict -> encode, the task given or routed by the gate."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from server.http.auth import require_api_key
from server.http.errors import InvalidRequest, UnknownTask
from server.http.openapi import CLASSIFY_BODY, error_responses
from server.http.requests import decode_all, encode_prediction, read_classify_request
from server.http.schemas import ClassifyResponse
from server.http.state import Decoded, ServerState


def router(state: ServerState) -> APIRouter:
    """The routes, bound to one server's state."""
    router = APIRouter()

    @router.post(
        "/v1/classify",
        tags=["inference"],
        response_model=ClassifyResponse,
        openapi_extra=CLASSIFY_BODY,
        summary="classify images (task from the gate, or given)",
        responses=error_responses(400, 401, 413, 415, 422, 429, 500, 503, 504),
    )
    async def classify(request: Request, response: Response) -> dict[str, Any]:
        start = time.perf_counter()
        require_api_key(request, state.settings)
        engine = state.engine()  # pinned for the whole request: one version per response
        opts, blobs = await read_classify_request(request, state.settings)
        task: int | None = None
        if opts.task is not None:
            if opts.task not in engine.tasks:
                raise UnknownTask(f"unknown task '{opts.task}'; this model serves: {', '.join(engine.tasks)}")
            task = engine.task_index(opts.task)
        elif not engine.has_router:
            raise InvalidRequest(
                f"bundle {engine.version} has no gate: name the task (one of {', '.join(engine.tasks)})",
                code="task_required",
            )

        def decode() -> Decoded:
            xs, gates = decode_all(blobs, engine, task, state.settings)
            return xs, gates, [task] * len(xs)

        results, decoded = await state.classify(engine, decode)
        preds = [encode_prediction(engine, r, opts.top_k) for r in results]
        response.headers["X-Model-Version"] = engine.version
        return {
            "model_version": engine.version,
            "predictions": preds,
            "timing": {
                "total_ms": round(1000 * (time.perf_counter() - start), 3),
                "decode_ms": round(1000 * (decoded - start), 3),
                "queue_ms": round(1000 * max(r.queue_s for r in results), 3),
                "inference_ms": round(1000 * max(r.inference_s for r in results), 3),
                "batch_sizes": sorted({r.batch_size for r in results}),
            },
        }

    router.add_api_route("/classify", classify, methods=["POST"], include_in_schema=False)
    return router
