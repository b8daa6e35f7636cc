"""The FastAPI application: thin routes over the batcher, the engine and merge jobs.

Request path (hooks in the LitServe sense): **decode** (read the body, validate,
decode and preprocess images in a thread pool) -> **batch** (the dynamic batcher
queues images for the single inference worker) -> **predict** (the engine routes,
groups by task and classifies) -> **encode** (top-k, labels, version, timings).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from server.http.batcher import Batcher, ItemResult
from server.http.codec import configure_pillow, decode_base64, decode_image, decode_json
from server.http.errors import (
    APIError,
    Forbidden,
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    Timeout,
    Unauthorized,
    UnknownTask,
    UnsupportedMediaType,
    error_body,
    install_error_handlers,
    request_id_of,
)
from server.http.merge_jobs import MergeJobs
from server.http.metrics import ServerMetrics
from server.http.model_manager import ModelManager
from server.http.schemas import (
    ClassifyJSON,
    ClassifyOptions,
    ClassifyResponse,
    ErrorResponse,
    MergeJobView,
    MergeRequest,
    ModelsResponse,
    ModelVersion,
    ReadyResponse,
    TaskInfo,
    TasksResponse,
)
from server.http.settings import ServerSettings
from server.runtime.protocol import InferenceEngine

log = logging.getLogger("vitmerge.server")
access_log = logging.getLogger("vitmerge.access")


class ServerState:
    """Everything one running server owns."""

    def __init__(self, settings: ServerSettings, progress: bool = False):
        self.settings = settings
        self.progress = progress
        self.metrics = ServerMetrics()
        self.manager = ModelManager(settings, self.metrics)
        self.jobs = MergeJobs(self.manager, self.metrics)
        self.batcher: Batcher | None = None
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="vitmerge-decode")
        self._tasks: list[asyncio.Task] = []
        self.on_ready: list[Callable[[InferenceEngine], None]] = []

    async def start(self) -> None:
        s = self.settings
        self.batcher = Batcher(s.max_batch_size, s.max_wait_ms, s.max_queue, self.metrics)
        self.batcher.start()
        self._tasks.append(asyncio.create_task(self._bootstrap(), name="vitmerge-bootstrap"))
        if s.watch_interval_s > 0:
            self._tasks.append(asyncio.create_task(self.manager.watch(lambda: self.jobs.busy), name="vitmerge-watch"))

    async def _bootstrap(self) -> None:
        try:
            engine = await asyncio.to_thread(self.manager.bootstrap, self.progress)
        except Exception:
            return  # the manager recorded the error; /readyz reports it
        for callback in self.on_ready:
            try:
                callback(engine)
            except Exception:  # pragma: no cover - informational only
                log.exception("on_ready callback failed")

    async def stop(self) -> None:
        """Graceful: finish queued images, then stop background tasks and threads."""
        if self.batcher is not None:
            await self.batcher.stop(drain_timeout=self.settings.request_timeout_s)
        for task in self._tasks:
            task.cancel()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        engine = self.manager.engine
        return engine is not None and engine.alive and self.batcher is not None and self.batcher.alive

    def engine(self) -> InferenceEngine:
        engine = self.manager.engine
        if self.batcher is not None and self.batcher.stopping:
            raise NotReady(
                "server is shutting down (draining queued requests); retry on another replica",
                code="shutting_down",
                headers={"Retry-After": "1"},
            )
        if engine is None or not engine.alive or self.batcher is None or not self.batcher.alive:
            raise NotReady(
                f"model not loaded (state: {self.manager.state}{'; ' + self.manager.error if self.manager.error else ''})",
                headers={"Retry-After": "5"},
            )
        return engine


# -- middleware ----------------------------------------------------------------------------
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")


def request_id(given: bytes | None) -> str:
    """The client's ``X-Request-ID`` when it is a sane token (<= 128 visible characters), else a new one."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given.decode()
    return uuid.uuid4().hex


class ServingMiddleware:
    """Body-size limit (413 before reading, or while streaming) + request metrics."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        limit = self.state.settings.max_body_bytes
        request_headers = dict(scope.get("headers") or [])
        rid = request_id(request_headers.get(b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                version = self.state.manager.version
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                if version is not None and not any(k.lower() == b"x-model-version" for k, _ in headers):
                    headers.append((b"x-model-version", version.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            length = request_headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                err = (
                    PayloadTooLarge(
                        f"request body of {length.decode(errors='replace')} bytes is above the limit of {limit} bytes"
                    )
                    if length.isdigit()
                    else InvalidRequest("invalid Content-Length header", status=400)
                )
                await JSONResponse(error_body(err.code, err.message, rid), status_code=err.status)(
                    scope, receive, send_wrapper
                )
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise PayloadTooLarge(f"request body is above the limit of {limit} bytes")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            route = self._route(scope)
            elapsed = time.perf_counter() - start
            m = self.state.metrics
            m.requests.labels(route, scope.get("method", ""), str(status["code"])).inc()
            m.latency.labels(route).observe(elapsed)
            access_log.info(
                '%s "%s %s" %d %.1f ms request_id=%s',
                (scope.get("client") or ("-",))[0],
                scope.get("method", ""),
                scope.get("path", ""),
                status["code"],
                1000 * elapsed,
                rid,
            )

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        app = scope.get("app")
        for r in getattr(app, "routes", []):
            if r.matches(scope)[0] == Match.FULL:
                return getattr(r, "path", "other")
        return "unmatched"


# -- auth ------------------------------------------------------------------------------------
def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: SecretStr) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


def require_admin(request: Request, settings: ServerSettings) -> None:
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise Forbidden("admin API is disabled: set VITMERGE_ADMIN_TOKEN (or --admin-token)", code="admin_disabled")
    token = _bearer(request)
    if token is None:
        raise Unauthorized("admin route: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, settings.admin_token):
        raise Unauthorized(
            "admin route: invalid token",
            code="invalid_token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


def require_api_key(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    given = _bearer(request) or request.headers.get("x-api-key")
    if not _matches(given, settings.api_key):
        raise Unauthorized(
            "classify needs an API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


# -- decode ----------------------------------------------------------------------------------
async def read_classify_request(request: Request, settings: ServerSettings) -> tuple[ClassifyOptions, list[bytes]]:
    """Body (JSON, multipart or a raw image) -> options + image bytes; 4xx on anything wrong."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = {k: v for k, v in request.query_params.items() if k in ("task", "top_k")}
    unknown_query = sorted(set(request.query_params) - {"task", "top_k"})
    if unknown_query:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown_query)} (allowed: task, top_k)")
    if media == "application/json":
        body = await request.body()
        if not body.strip():
            raise InvalidRequest("request body is empty", code="empty_body")
        data = decode_json(body)
        if not isinstance(data, dict):
            raise InvalidRequest('JSON body must be an object like {"images": ["<base64>", ...]}')
        images = data.get("images")
        if isinstance(images, list) and len(images) > settings.max_images:
            raise PayloadTooLarge(
                f"{len(images)} images in one request; the limit is {settings.max_images}", code="too_many_images"
            )
        try:
            req = ClassifyJSON.model_validate({**query, **data})
        except ValidationError as e:
            raise InvalidRequest(_first_error(e)) from e
        return ClassifyOptions(task=req.task, top_k=req.top_k), [decode_base64(s, i) for i, s in enumerate(req.images)]
    if media == "multipart/form-data":
        try:
            form = await request.form(
                max_files=settings.max_images + 1, max_fields=32, max_part_size=settings.max_body_bytes
            )
        except StarletteHTTPException as e:
            if "Too many files" in str(e.detail):
                raise PayloadTooLarge(
                    f"more than {settings.max_images} images in one request", code="too_many_images"
                ) from e
            raise InvalidRequest(f"malformed multipart body: {e.detail}", status=400, code="invalid_multipart") from e
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if len(files) > settings.max_images:
            raise PayloadTooLarge(
                f"{len(files)} images in one request; the limit is {settings.max_images}", code="too_many_images"
            )
        if not files:
            raise InvalidRequest(
                "multipart body has no image files (send them as file parts, e.g. -F image=@cat.png)", code="no_images"
            )
        try:
            opts = ClassifyOptions.model_validate({**query, **fields})
        except ValidationError as e:
            raise InvalidRequest(_first_error(e)) from e
        return opts, [await f.read() for f in files]
    if media.startswith("image/"):
        body = await request.body()
        try:
            opts = ClassifyOptions.model_validate(query)
        except ValidationError as e:
            raise InvalidRequest(_first_error(e)) from e
        return opts, [body]
    shown = media or "none"
    raise UnsupportedMediaType(
        f"Content-Type {shown} is not supported: use application/json, multipart/form-data or image/*"
    )


async def read_merge_request(request: Request) -> MergeRequest:
    """A ``POST /v1/merge`` body -> MergeRequest: 415 if not JSON, 400 if unparsable, 422 if invalid."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType(f"Content-Type {media or 'none'} is not supported: send application/json")
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("request body is empty", code="empty_body")
    data = decode_json(body)
    try:
        return MergeRequest.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(_first_error(e), code="invalid_merge_request") from e


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{loc}: {err.get('msg', 'invalid')}"


def _decode_all(
    blobs: list[bytes], engine: InferenceEngine, need_gate: bool, max_pixels: int
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    xs, gs = [], []
    for i, blob in enumerate(blobs):
        arr = decode_image(blob, max_pixels, what=f"image {i}")
        x, g = engine.preprocess(arr, need_gate)
        xs.append(x)
        gs.append(g)
    return xs, gs


# -- encode ----------------------------------------------------------------------------------
def encode_prediction(engine: InferenceEngine, result: ItemResult, top_k: int) -> dict[str, Any]:
    out = result.output
    name = engine.tasks[out.task]
    labels = engine.class_names[name]
    values, indices = out.probabilities.topk(min(top_k, out.probabilities.numel()))
    top = [{"index": int(i), "label": labels[int(i)], "probability": float(v)} for v, i in zip(values, indices)]
    return {
        "task": {"name": name, "index": out.task, "probability": out.task_probability, "source": out.source},
        "class": top[0],
        "top_k": top,
    }


# -- the app ---------------------------------------------------------------------------------
_STATUS = {
    400: "malformed body (unparsable JSON, bad multipart, undecodable base64)",
    401: "missing or wrong bearer token",
    403: "admin endpoints are disabled (no VITMERGE_ADMIN_TOKEN)",
    404: "no such merge job",
    409: "a merge is already running",
    413: "body or image larger than the limits",
    415: "unsupported content type",
    422: "well-formed but invalid: schema, unknown task, unusable image, method or params",
    429: "the request queue is full (Retry-After)",
    500: "a batch failed inside the engine",
    503: "no model loaded yet, or the server is draining (Retry-After)",
    504: "the request did not finish within the request timeout",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: each with the JSON error body (``ErrorResponse``)."""
    return {code: {"model": ErrorResponse, "description": _STATUS[code]} for code in codes}


#: Statuses the serving middleware can answer on any route (draining; body over the limit).
_ANY = (413, 503)

_MERGE_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": MergeRequest.model_json_schema()}}}
}

_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                            "description": "image files (a single part named `image` is accepted too)",
                        },
                        "task": {"type": "string", "minLength": 1},
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


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
        description="Merged multi-task Vision Transformers: classify with the gate or a given task; merge and hot-swap bundles.",
        lifespan=lifespan,
    )
    app.state.vitmerge = state
    install_error_handlers(app)
    app.add_middleware(ServingMiddleware, state=state)

    @app.get("/healthz", tags=["ops"], summary="liveness", responses=_errors(*_ANY))
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="readiness: 200 while a model is loaded and the worker is alive",
        response_model=ReadyResponse,
        responses=_errors(*_ANY),
    )
    async def readyz(request: Request) -> JSONResponse:
        ready = state.ready
        state.metrics.ready.set(1 if ready else 0)
        if not ready:
            msg = f"not ready (state: {state.manager.state}{'; ' + state.manager.error if state.manager.error else ''})"
            return JSONResponse(error_body("not_ready", msg, request_id_of(request)), status_code=503)
        return JSONResponse({"status": "ready", "model_version": state.manager.version})

    @app.get(
        "/metrics",
        tags=["ops"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **_errors(*_ANY),
        },
    )
    async def metrics() -> PlainTextResponse:
        state.metrics.ready.set(1 if state.ready else 0)
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/tasks",
        tags=["models"],
        response_model=TasksResponse,
        summary="tasks and classes of the served bundle",
        responses=_errors(*_ANY),
    )
    async def tasks() -> TasksResponse:
        engine = state.engine()
        infos = [TaskInfo(name=t, index=i, classes=engine.class_names[t]) for i, t in enumerate(engine.tasks)]
        return TasksResponse(model_version=engine.version, gate=engine.has_gate, tasks=infos)

    @app.get(
        "/v1/models",
        tags=["models"],
        response_model=ModelsResponse,
        summary="bundle versions in the store",
        responses=_errors(*_ANY),
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
                except Exception:
                    continue
                versions.append(
                    ModelVersion(
                        version=v,
                        method=m.method,
                        tasks=m.tasks,
                        created_at=m.created_at,
                        current=v == current,
                        serving=v == serving,
                    )
                )
            return ModelsResponse(current=current, serving=serving, versions=versions)

        return await asyncio.to_thread(listing)

    @app.post(
        "/v1/classify",
        tags=["inference"],
        response_model=ClassifyResponse,
        openapi_extra=_CLASSIFY_BODY,
        summary="classify images (task from the gate, or given)",
        responses=_errors(400, 401, 413, 415, 422, 429, 500, 503, 504),
    )
    async def classify(request: Request, response: Response) -> dict[str, Any]:
        start = time.perf_counter()
        require_api_key(request, settings)
        engine = state.engine()  # pinned for the whole request: one version per response
        opts, blobs = await read_classify_request(request, settings)
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
                state.decode_pool, _decode_all, blobs, engine, task is None, settings.max_image_pixels
            )
            decoded = time.perf_counter()
            futures = state.batcher.submit(engine, xs, gates, [task] * len(xs))
        try:
            results: list[ItemResult] = await asyncio.wait_for(asyncio.gather(*futures), settings.request_timeout_s)
        except TimeoutError:
            raise Timeout(f"request did not finish within {settings.request_timeout_s:g} s") from None
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

    app.add_api_route("/classify", classify, methods=["POST"], include_in_schema=False)

    def admin(request: Request) -> None:
        require_admin(request, settings)

    @app.post(
        "/v1/merge",
        tags=["admin"],
        status_code=202,
        response_model=MergeJobView,
        summary="start a merge job (admin)",
        openapi_extra=_MERGE_BODY,
        responses=_errors(400, 401, 403, 409, 413, 415, 422, 503),
        dependencies=[Depends(admin)],
    )
    async def merge(request: Request) -> dict[str, Any]:
        body = await read_merge_request(request)
        job = await asyncio.to_thread(state.jobs.submit, body.method, body.params, body.tasks)
        return job.as_dict()

    @app.get(
        "/v1/merge/{job_id}",
        tags=["admin"],
        response_model=MergeJobView,
        summary="a merge job's state (admin)",
        dependencies=[Depends(admin)],
        responses=_errors(401, 403, 404, *_ANY),
    )
    async def merge_job(job_id: str) -> dict[str, Any]:
        return state.jobs.get(job_id).as_dict()

    app.add_api_route(
        "/merge", merge, methods=["POST"], status_code=202, include_in_schema=False, dependencies=[Depends(admin)]
    )
    app.add_api_route(
        "/merge/{job_id}", merge_job, methods=["GET"], include_in_schema=False, dependencies=[Depends(admin)]
    )
    return app


__all__ = ["APIError", "ServerState", "create_app"]
