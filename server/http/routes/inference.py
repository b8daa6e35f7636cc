"""``POST /v1/classify``: decode -> batch -> predict -> encode, the task given or routed by the gate."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request, Response

from server.http.auth import require_api_key
from server.http.errors import InvalidRequest, UnknownTask
from server.http.openapi import CLASSIFY_BODY, error_responses
from server.http.requests import encode_prediction, read_classify_request
from server.http.schemas import ClassifyResponse
from server.http.state import ServerState
from server.runtime.inputs import ImageInput


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
    async def classify(request: Request) -> Response:
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

        inputs = [ImageInput(task, blob, what=f"image {i}") for i, blob in enumerate(blobs)]
        results, queued = await state.classify(engine, inputs)
        body = {
            "model_version": engine.version,
            "predictions": [encode_prediction(engine, r, opts.top_k) for r in results],
            "timing": {
                "total_ms": round(1000 * (time.perf_counter() - start), 3),
                "decode_ms": round(1000 * (queued - start + max(r.prepare_s for r in results)), 3),
                "queue_ms": round(1000 * max(r.queue_s for r in results), 3),
                "inference_ms": round(1000 * max(r.inference_s for r in results), 3),
                "batch_sizes": sorted({r.batch_size for r in results}),
            },
        }
        # encoded here, in ClassifyResponse's shape (response_model documents it): FastAPI's validate-and-serialise
        # pass over the body is skipped (BENCHMARKS.md, "Where a request's time goes")
        content = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        return Response(content, media_type="application/json", headers={"X-Model-Version": engine.version})

    router.add_api_route("/classify", classify, methods=["POST"], include_in_schema=False)
    return router
