"""OpenAPI details the route signatures cannot say: every error status with its JSON body, request bodies."""

from __future__ import annotations

from typing import Any

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
