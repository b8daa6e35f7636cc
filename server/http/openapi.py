"""OpenAPI details the route signatures cannot say: every error status with its JSON body, request bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from server.http.schemas import ClassifyJSON, ErrorResponse, MergeRequest

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
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(InferRequest)},
                "application/octet-stream": binary,
            },
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
