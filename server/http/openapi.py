"""OpenAPI details the route signatures cannot say: every error status with its JSON body, request bodies, and
(per request of ``/openapi.json``) what the served bundle accepts: its tasks, versions and input tensors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel

from server.http.oip.schemas import RepositoryIndexRequest
from server.http.schemas import ClassifyJSON, ErrorResponse, MergeRequest
from server.http.settings import ServerSettings

if TYPE_CHECKING:
    from server.http.state import ServerState
    from server.runtime.protocol import InferenceEngine

STATUS_TEXT = {
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


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: each with the JSON error body (``ErrorResponse``)."""
    return {code: {"model": ErrorResponse, "description": STATUS_TEXT[code]} for code in codes}


#: Statuses the serving middleware can answer on any route (draining; body over the limit).
ANY_ROUTE = (413, 503)


MERGE_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": MergeRequest.model_json_schema()}}}
}


CLASSIFY_BODY = {
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


V2_STATUS_TEXT = {
    400: "the request does not fit the protocol or the model (tensor name, datatype, shape, data), or not ready",
    401: "missing or wrong bearer token / API key",
    403: "admin endpoints are disabled (no VITMERGE_ADMIN_TOKEN)",
    404: "no such model or version",
    409: "a merge or version switch is running, or the request would unload the only model",
    413: "body or image larger than the limits",
    415: "unsupported Content-Encoding",
    422: "unknown task, undecodable image, or a version that does not load",
    429: "the request queue is full (Retry-After)",
    500: "a batch failed inside the engine",
    503: "no model loaded yet, or the server is draining (Retry-After)",
    504: "the request did not finish within the request timeout",
}


def v2_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the ``/v2`` routes' errors: the protocol's ``{"error": "..."}`` body."""
    from server.http.oip.schemas import V2Error

    return {code: {"model": V2Error, "description": V2_STATUS_TEXT[code]} for code in codes}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` references inlined (valid anywhere in an OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def v2_infer_body() -> dict[str, Any]:
    """The infer request body: the JSON form, or the binary tensor data extension (JSON header + raw tensors)."""
    from server.http.oip.schemas import InferRequest, InferResponse

    binary = {
        "schema": {"type": "string", "format": "binary"},
        "description": "JSON header of Inference-Header-Content-Length bytes, then the inputs' raw data",
    }
    return {
        "description": (
            "The JSON form below, or the binary tensor data extension (what tritonclient sends by default): the "
            "body is a JSON header of `Inference-Header-Content-Length` bytes, then the raw data of every input "
            "with `parameters.binary_data_size`, in input order."
        ),
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(InferRequest)}},
        },
        "responses": {
            "200": {
                "description": "outputs in JSON, or JSON header + binary outputs (binary_data_output)",
                "content": {
                    "application/json": {"schema": inline_schema(InferResponse)},
                    "application/octet-stream": binary,
                },
            }
        },
    }


#: ``format`` of a base64-encoded image file (plain base64 or a ``data:image/...;base64,`` URL) in JSON bodies
IMAGE_FORMAT = "base64-image"
#: the largest finite FP32 magnitude, rounded down: PIXELS values beyond it would become infinite
FP32_LIMIT = 3.0e38
_NOTHING: dict[str, Any] = {"not": {}}
_VERSION_PATTERN = r"^v?[0-9]+$"


def served_openapi(app: FastAPI, state: ServerState) -> Callable[[], dict[str, Any]]:
    """``app.openapi``: the route-derived document, made precise for the bundle being served.

    Which tasks, versions and tensors the server accepts depends on the served bundle (and on limits such as
    ``max_images``), so each request of ``/openapi.json`` gets the static document with those filled in:
    tasks and versions as enums, the ``/v2`` infer body as the exact tensors the model takes. A client (or a
    fuzzer) that follows the document sends nothing the server refuses, and the document allows nothing the
    server accepts only by accident.
    """
    base: dict[str, Any] | None = None

    def openapi() -> dict[str, Any]:
        nonlocal base
        if base is None:
            base = FastAPI.openapi(app)
        doc = copy.deepcopy(base)
        engine = state.manager.engine
        describe_served(doc, state.settings, engine, state.manager.store.versions() if engine is not None else [])
        return doc

    return openapi


def describe_served(
    doc: dict[str, Any], settings: ServerSettings, engine: InferenceEngine | None, versions: list[str]
) -> None:
    """Fill ``doc`` (in place) with what this server accepts now; without a model only the static limits."""
    paths = doc["paths"]
    served = [engine.version, engine.version.removeprefix("v")] if engine is not None else None
    version = {"type": "string", "enum": served} if served else {"type": "string", "pattern": _VERSION_PATTERN}
    for path, ops in paths.items():
        for op in ops.values():
            for param in op.get("parameters", []):
                if path.startswith(("/v2/models/", "/v2/repository/models/")) and param["name"] == "name":
                    param["schema"] = {"type": "string", "enum": [settings.model_name]}
                elif path.startswith("/v2/models/") and param["name"] == "version":
                    param["schema"] = dict(version)
    classify = paths["/v1/classify"]["post"]
    _describe_classify(classify, settings, engine)
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        content = paths[path]["post"]["requestBody"]["content"]
        if engine is not None:
            content["application/json"]["schema"] = infer_request_schema(engine, settings.max_images)
    load = paths["/v2/repository/models/{name}/load"]["post"]
    load["requestBody"] = {"required": False, "content": {"application/json": {"schema": _load_schema(versions)}}}
    paths["/v2/repository/index"]["post"]["requestBody"] = {
        "required": False,
        "content": {"application/json": {"schema": inline_schema(RepositoryIndexRequest)}},
    }


def _load_schema(versions: list[str]) -> dict[str, Any]:
    """``POST .../load``: ``parameters.version`` names a version in the store (``v3`` or ``3``), default CURRENT."""
    names: list[Any] = [*versions, *(v.removeprefix("v") for v in versions)]
    numbers: list[Any] = [int(v.removeprefix("v")) for v in versions]
    version = {"enum": [*names, *numbers, None]} if versions else {"type": ["string", "integer", "null"]}
    return {
        "type": "object",
        "properties": {
            "parameters": {
                "type": "object",
                "properties": {"version": {**version, "description": "the bundle version to serve (null: CURRENT)"}},
            }
        },
    }


def _describe_classify(op: dict[str, Any], settings: ServerSettings, engine: InferenceEngine | None) -> None:
    """``/v1/classify``: images of an image format, at most ``max_images``; ``task`` one of the served tasks."""
    content = op["requestBody"]["content"]
    json_body = content["application/json"]["schema"]
    images = json_body["properties"]["images"]
    images["maxItems"] = settings.max_images
    images["items"]["format"] = IMAGE_FORMAT
    form = content["multipart/form-data"]
    form["schema"]["additionalProperties"] = False
    form["schema"]["properties"]["images"]["maxItems"] = settings.max_images
    form["encoding"] = {"images": {"contentType": ", ".join(IMAGE_MEDIA_TYPES)}}
    content["image/*"]["schema"]["description"] = "one image file"
    task: dict[str, Any] = {"type": "string", "minLength": 1}
    if engine is not None:
        task = {"type": "string", "enum": list(engine.tasks)}
    json_body["properties"]["task"]["anyOf"][0] = dict(task)
    form["schema"]["properties"]["task"] = dict(task)
    query = [
        {"name": "task", "in": "query", "required": False, "schema": dict(task)},
        {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 20}},
    ]
    if engine is not None and not engine.has_gate:  # no gate: every request names its task (here, or in the body)
        query[0]["required"] = True
    op["parameters"] = query


#: image media types a multipart part may declare (the server reads the bytes, whatever the part says)
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def _tensor(name: str, datatype: str, shape: list[int], items: dict[str, Any], count: int) -> dict[str, Any]:
    """One input tensor of the JSON form: its name, datatype and shape fixed, ``count`` flat elements."""
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"const": name},
            "datatype": {"const": datatype},
            "shape": {"const": shape},
            "data": {"type": "array", "items": items, "minItems": count, "maxItems": count},
            "parameters": {"type": "object", "properties": {"binary_data_size": _NOTHING}},
        },
    }


def infer_request_schema(engine: InferenceEngine, max_images: int) -> dict[str, Any]:
    """The JSON infer request ``engine`` takes: ``IMAGE`` (base64 files) or ``PIXELS``, then ``TASK``.

    One alternative per batch size ``n`` (1..``max_images``): JSON Schema cannot tie ``shape`` to the number
    of elements, so each ``n`` is spelled out. ``TASK`` (``""``: the gate routes) is optional when the bundle
    has a gate. The binary tensor extension (``Inference-Header-Content-Length``) is not described here.
    """
    from server.http.oip.model import OUTPUTS

    prep = engine.preprocessing
    image = {"type": "string", "format": IMAGE_FORMAT}
    pixel = {"type": "number", "minimum": -FP32_LIMIT, "maximum": FP32_LIMIT}
    task = {"type": "string", "enum": ([""] if engine.has_gate else []) + list(engine.tasks)}
    per_image = prep.channels * prep.size * prep.size
    batches = []
    for n in range(1, max_images + 1):
        for source in (
            _tensor("IMAGE", "BYTES", [n], image, n),
            _tensor("PIXELS", "FP32", [n, prep.channels, prep.size, prep.size], pixel, n * per_image),
        ):
            batches.append(
                {
                    "prefixItems": [source, _tensor("TASK", "BYTES", [n], task, n)],
                    "items": _NOTHING,
                    "minItems": 1 if engine.has_gate else 2,
                }
            )
    binary = {"type": "boolean"}
    classification = {"type": ["integer", "null"], "minimum": 1}  # null: as if absent
    outputs = {
        "type": "array",
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"const": "PROBABILITIES"},
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data": binary, "classification": classification},
                        },
                    },
                },
                {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"enum": [o for o in OUTPUTS if o != "PROBABILITIES"]},
                        "parameters": {
                            "type": "object",
                            "properties": {"binary_data": binary, "classification": _NOTHING},
                        },
                    },
                },
            ]
        },
    }
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": ["string", "null"]},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_output": binary, "top_k": classification},
                "description": "binary_data_output: outputs as binary data; top_k: PROBABILITIES as top-k strings",
            },
            "inputs": {"type": "array", "anyOf": batches},
            "outputs": {"anyOf": [outputs, {"type": "null"}]},  # null: the default outputs
        },
    }
