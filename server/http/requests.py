"""Reading request bodies and writing predictions: the decode and encode hooks of the request path.

``/v1/classify`` takes JSON (base64 images), multipart files or one raw image; ``/v1/merge`` takes JSON.
Anything wrong is a 4xx :class:`~server.http.errors.APIError` naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.http.batcher import ItemResult
from server.http.codec import decode_base64, decode_json
from server.http.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from server.http.schemas import ClassifyJSON, ClassifyOptions, MergeRequest
from server.http.settings import ServerSettings
from server.runtime.protocol import InferenceEngine


async def read_classify_request(request: Request, settings: ServerSettings) -> tuple[ClassifyOptions, list[bytes]]:
    """Body (JSON, multipart or a raw image) -> options + image bytes; 4xx on anything wrong."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = _query_options(request)
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
        if "task" in data and data["task"] is None:  # null: not given here (a query task still applies)
            data = {k: v for k, v in data.items() if k != "task"}
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
        files: list[UploadFile | bytes] = [
            v if isinstance(v, UploadFile) else _text_part_bytes(v)
            for k, v in form.multi_items()
            if isinstance(v, UploadFile) or k in ("image", "images")
        ]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str) and k not in ("image", "images")}
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
        return opts, [await f.read() if isinstance(f, UploadFile) else f for f in files]
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


def _query_options(request: Request) -> dict[str, str]:
    """``task`` / ``top_k`` from the query string, valid on their own (a body field of the same name wins)."""
    query = {k: v for k, v in request.query_params.items() if k in ("task", "top_k")}
    unknown_query = sorted(set(request.query_params) - {"task", "top_k"})
    if unknown_query:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown_query)} (allowed: task, top_k)")
    try:
        ClassifyOptions.model_validate(query)
    except ValidationError as e:
        raise InvalidRequest(_first_error(e)) from e
    return query


def _text_part_bytes(value: str) -> bytes:
    """The bytes of an ``image``/``images`` part sent without a filename, which Starlette hands over as text.

    Starlette decodes such a part as UTF-8, or as Latin-1 when it is not valid UTF-8 -- which an image file
    (PNG and JPEG start with bytes UTF-8 never begins with) practically never is; Latin-1 maps back losslessly.
    """
    return value.encode("utf-8") if any(ord(c) > 0xFF for c in value) else value.encode("latin-1")


@dataclass(frozen=True)
class MergeOrder:
    """A merge request that passed validation: the registry's method name, its parameters as an instance of
    that method's own params model (defaults filled in), the tasks (None: all), and -- to choose settings without
    labels -- the target agreement and the grid it chooses from."""

    method: str
    params: BaseModel
    tasks: list[str] | None
    target_agreement: float | None = None
    grid: dict[str, list[Any]] | None = None


async def read_merge_request(request: Request) -> MergeOrder:
    """A ``POST /v1/merge`` body -> MergeOrder: 415 if not JSON, 400 if unparsable, 422 if the body, the method
    or its parameters are invalid (the method's params model says which, and lists the valid ones)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType(f"Content-Type {media or 'none'} is not supported: send application/json")
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("request body is empty", code="empty_body")
    data = decode_json(body)
    try:
        req = MergeRequest.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(_first_error(e), code="invalid_merge_request") from e
    from merging.pipeline import get_method, parse_params, selection_grid  # admin path only

    try:
        name = get_method(req.method).name
        params = parse_params(name, req.params)
        if req.grid is not None and req.target_agreement is None:
            raise ValueError("a grid needs target_agreement (the grid is what the target chooses from)")
        if req.target_agreement is not None:
            selection_grid(name, req.params, req.grid)
    except (KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise InvalidRequest(message, code="invalid_merge_request") from e
    if req.tasks is not None and len(set(req.tasks)) != len(req.tasks):
        raise InvalidRequest("tasks must be unique", code="invalid_merge_request")
    return MergeOrder(name, params, req.tasks, req.target_agreement, req.grid)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{loc}: {err.get('msg', 'invalid')}"


def encode_prediction(engine: InferenceEngine, result: ItemResult, top_k: int) -> dict[str, Any]:
    out = result.output
    name = engine.tasks[out.task]
    labels = engine.class_names[name]
    values, indices = out.probabilities.topk(min(top_k, out.probabilities.numel()))
    top = [{"index": int(i), "label": labels[int(i)], "probability": float(v)} for v, i in zip(values, indices)]
    return {
        "task": {
            "name": name,
            "index": out.task,
            "probability": out.task_probability,
            "source": out.source,
            "probabilities": dict(zip(engine.tasks, out.task_probabilities.tolist())),
        },
        "class": top[0],
        "top_k": top,
    }
