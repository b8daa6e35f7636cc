"""``POST /v1/classify``: decode -> batch -> predict -> encode, the task given or routed by the gate."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request, Response

from server.http.auth import require_api_key
from server.http.batcher import ItemResult
from server.http.errors import InvalidRequest, Timeout, UnknownTask
from server.http.openapi import CLASSIFY_BODY, error_responses
from server.http.requests import decode_all, encode_prediction, read_classify_request
from server.http.schemas import ClassifyResponse
from server.http.state import ServerState


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
        elif not engine.has_gate:
            raise InvalidRequest(
                f"bundle {engine.version} has no gate: name the task (one of {', '.join(engine.tasks)})",
                code="task_required",
            )
        loop = asyncio.get_running_loop()
        assert state.batcher is not None
        with state.batcher.incoming():
            xs, gates = await loop.run_in_executor(
                state.decode_pool, decode_all, blobs, engine, task is None, state.settings.max_image_pixels
            )
            decoded = time.perf_counter()
            futures = state.batcher.submit(engine, xs, gates, [task] * len(xs))
        try:
            results: list[ItemResult] = await asyncio.wait_for(
                asyncio.gather(*futures), state.settings.request_timeout_s
            )
        except TimeoutError:
            raise Timeout(f"request did not finish within {state.settings.request_timeout_s:g} s") from None
        preds = [encode_prediction(engine, r, opts.top_k) for r in results]
        for r in results:
            state.metrics.predictions.labels(engine.tasks[r.output.task], r.output.source).inc()
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
