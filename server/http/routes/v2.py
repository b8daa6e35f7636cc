"""The Open Inference Protocol (KServe v2 / Triton HTTP): health, metadata, infer, the model repository extension.

Same batcher, engine, limits, auth and metrics as ``/v1``; errors in the protocol's form
``{"error": "..."}``. One model (``VITMERGE_MODEL_NAME``, default ``vitmerge``); its versions are the
store's bundle versions (``v3`` or ``3``); only the served one answers infer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from server.http.auth import require_admin, require_api_key
from server.http.codec import decode_json
from server.http.errors import Conflict, InvalidTensor, NotFound
from server.http.oip import model as oip
from server.http.oip.schemas import (
    ModelMetadata,
    RepositoryIndexRequest,
    RepositoryLoadRequest,
    RepositoryModel,
    ServerMetadata,
)
from server.http.oip.wire import HEADER_LENGTH, decode_input, decompress, encode_response, parse_request, split_binary
from server.http.openapi import v2_error_responses, v2_infer_body
from server.http.state import ServerState
from server.runtime.inputs import ImageInput
from server.runtime.protocol import InferenceEngine

#: extensions of the protocol this server implements
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
Body = TypeVar("Body", bound=BaseModel)
#: request bodies up to this size have their tensors decoded on the event loop (a thread hop costs more)
INLINE_BODY_BYTES = 64 * 1024


def version_name(version: str) -> str:
    """``3`` (Triton style) or ``v3`` -> ``v3``."""
    return f"v{version}" if version.isdigit() else version


async def _json_body(request: Request, model: type[Body]) -> Body:
    """An optional JSON body (empty = defaults) validated as ``model``; 400 naming the problem."""
    raw = await request.body()
    data = decode_json(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise InvalidTensor("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidTensor(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}") from e


class Served:
    """The one model of this server under its protocol name: name checks and version pinning."""

    def __init__(self, state: ServerState):
        self.state = state
        self.name = state.settings.model_name

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise NotFound(f"unknown model '{name}'; this server serves '{self.name}'", code="unknown_model")

    async def pinned(self, name: str, version: str | None) -> InferenceEngine:
        """The served engine when ``name``/``version`` designate it; 404 unknown, 400 in the store but not loaded."""
        self.check_name(name)
        engine = self.state.engine()
        if version is None or version_name(version) == engine.version:
            return engine
        versions = await asyncio.to_thread(self.state.manager.store.versions)
        if version_name(version) in versions:
            raise InvalidTensor(
                f"version {version_name(version)} of '{name}' is in the store but not loaded (serving "
                f"{engine.version}); load it with POST /v2/repository/models/{name}/load",
                code="version_not_loaded",
            )
        raise NotFound(
            f"model '{name}' has no version '{version}' (versions: {', '.join(versions) or 'none'})",
            code="unknown_version",
        )


def router(state: ServerState) -> APIRouter:
    """The routes, bound to one server's state."""
    served = Served(state)
    router = APIRouter(tags=["v2 (Open Inference Protocol)"])
    router.include_router(_inference_routes(state, served))
    router.include_router(_repository_routes(state, served))
    return router


def _inference_routes(state: ServerState, served: Served) -> APIRouter:
    """Health, server and model metadata, readiness, infer."""
    router = APIRouter()
    settings = state.settings
    pinned, check_name = served.pinned, served.check_name

    @router.get("/v2", response_model=ServerMetadata, summary="server metadata", responses=v2_error_responses(413))
    async def server_metadata() -> ServerMetadata:
        from server import __version__

        return ServerMetadata(name="vitmerge", version=__version__, extensions=EXTENSIONS)

    @router.get("/v2/health/live", summary="liveness (200 = live)", responses=v2_error_responses(413))
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get(
        "/v2/health/ready", summary="readiness (200 = ready, 400 = not)", responses=v2_error_responses(400, 413)
    )
    async def ready() -> Any:
        if not state.ready:
            return JSONResponse({"error": f"not ready (state: {state.manager.state})"}, status_code=400)
        return {"ready": True}

    async def model_metadata(name: str, version: str | None = None) -> ModelMetadata:
        engine = await pinned(name, version)
        versions = await asyncio.to_thread(state.manager.store.versions)
        return oip.metadata(engine, name, versions)

    async def model_ready(name: str, version: str | None = None) -> Any:
        check_name(name)
        engine = state.manager.engine
        if not state.ready or engine is None:
            return JSONResponse({"error": f"model '{name}' is not ready (state: {state.manager.state})"}, 400)
        if version is not None and version_name(version) != engine.version:
            return JSONResponse(
                {"error": f"version {version} of '{name}' is not loaded (serving {engine.version})"}, 400
            )
        return {"name": name, "ready": True}

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        require_api_key(request, settings)
        engine = await pinned(name, version)  # pinned for the whole request: one version per response
        body = decompress(await request.body(), request.headers.get("content-encoding"), settings.max_body_bytes)
        req, rest = parse_request(body, request.headers.get(HEADER_LENGTH))
        names = [t.name for t in req.inputs]
        if len(set(names)) != len(names):
            raise InvalidTensor(f"inputs must have distinct names, got {names}")
        wanted = oip.wanted_outputs(req)
        chunks = split_binary(req, rest)

        def decode() -> list[ImageInput]:
            tensors = {t.name: decode_input(t, chunks.get(t.name)) for t in req.inputs}
            return oip.decode_inputs(tensors, engine, settings.max_images)

        start = time.perf_counter()
        # a large body's tensors (JSON lists, base64) are parsed in the decode pool, a small one's right here
        results, _ = await state.classify(engine, decode if len(body) > INLINE_BODY_BYTES else decode())
        outputs = oip.build_outputs(engine, [r.output for r in results], wanted)
        header: dict[str, Any] = {"model_name": name, "model_version": engine.version}
        if req.id is not None:
            header["id"] = req.id
        header["parameters"] = {"inference_ms": round(1000 * (time.perf_counter() - start), 3)}
        content, headers = encode_response(header, outputs, [w.binary for w in wanted])
        return Response(content, headers={**headers, "X-Model-Version": engine.version})

    for path, suffix in (("/v2/models/{name}", ""), ("/v2/models/{name}/versions/{version}", " (one version)")):
        router.add_api_route(
            path,
            model_metadata,
            methods=["GET"],
            response_model=ModelMetadata,
            summary="model metadata: tensors, shapes, tasks, classes, preprocessing" + suffix,
            responses=v2_error_responses(400, 404, 413, 503),
        )
        router.add_api_route(
            path + "/ready",
            model_ready,
            methods=["GET"],
            summary="model readiness (200 = ready, 400 = not)" + suffix,
            responses=v2_error_responses(400, 404, 413),
        )
        router.add_api_route(
            path + "/infer",
            infer,
            methods=["POST"],
            summary="classify images: IMAGE or PIXELS, optional TASK" + suffix,
            openapi_extra=v2_infer_body(),
            responses=v2_error_responses(400, 401, 404, 413, 415, 422, 429, 500, 503, 504),
        )

    return router


def _repository_routes(state: ServerState, served: Served) -> APIRouter:
    """The model repository extension (admin token): list versions, switch the served one, refuse unload."""
    router = APIRouter()
    settings = state.settings
    check_name = served.check_name

    def admin(request: Request) -> None:
        require_admin(request, settings)

    @router.post(
        "/v2/repository/index",
        response_model=list[RepositoryModel],
        summary="bundle versions in the store (admin)",
        dependencies=[Depends(admin)],
        responses=v2_error_responses(400, 401, 403, 413),
    )
    async def repository_index(request: Request) -> list[RepositoryModel]:
        body = await _json_body(request, RepositoryIndexRequest)
        serving = state.manager.version
        versions = await asyncio.to_thread(state.manager.store.versions)
        entries = [
            RepositoryModel(
                name=settings.model_name,
                version=v,
                state="READY" if v == serving else "UNAVAILABLE",
                reason="" if v == serving else "in the store, not loaded",
            )
            for v in versions
        ]
        return [e for e in entries if e.state == "READY"] if body.ready else entries

    @router.post(
        "/v2/repository/models/{name}/load",
        summary="serve a bundle version on every replica: parameters.version (default CURRENT) (admin)",
        dependencies=[Depends(admin)],
        responses=v2_error_responses(400, 401, 403, 404, 409, 413, 422),
    )
    async def repository_load(request: Request, name: str) -> dict[str, str]:
        check_name(name)
        body = await _json_body(request, RepositoryLoadRequest)
        version = body.parameters.get("version")
        if version is None:
            version = await asyncio.to_thread(state.manager.store.current_version)
            if version is None:
                raise NotFound("the store has no CURRENT bundle; give parameters.version", code="unknown_version")
        if not isinstance(version, (str, int)) or isinstance(version, bool):
            raise InvalidTensor(f"parameters.version must be a version like 'v3' or 3, got {version!r}")
        engine = await asyncio.to_thread(state.jobs.switch_current, version_name(str(version)))
        return {"name": name, "version": engine.version, "state": "READY"}

    @router.post(
        "/v2/repository/models/{name}/unload",
        summary="refused: one model is always served (load another version instead) (admin)",
        dependencies=[Depends(admin)],
        responses=v2_error_responses(401, 403, 404, 409, 413),
    )
    async def repository_unload(name: str) -> None:
        check_name(name)
        raise Conflict(
            f"'{name}' cannot be unloaded: this server always serves one model; switch versions with "
            f"POST /v2/repository/models/{name}/load",
            code="unload_refused",
        )

    return router


__all__ = ["EXTENSIONS", "router", "version_name"]
