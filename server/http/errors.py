"""API errors: every failure is JSON ``{"error": {"code", "message"}}`` with the right status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error with an HTTP status, a stable machine code and a human message."""

    status = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, status: int | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.status = status or type(self).status
        self.code = code or type(self).code
        self.headers = headers or {}


class InvalidImage(APIError):
    status, code = 400, "invalid_image"


class PayloadTooLarge(APIError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(APIError):
    status, code = 415, "unsupported_media_type"


class InvalidRequest(APIError):
    status, code = 422, "invalid_request"


class InvalidTensor(APIError):
    """A ``/v2`` request whose tensors do not fit the protocol or the model (name, datatype, shape, data)."""

    status, code = 400, "invalid_tensor"


class UnknownTask(APIError):
    status, code = 422, "unknown_task"


class QueueFull(APIError):
    status, code = 429, "queue_full"


class NotReady(APIError):
    status, code = 503, "model_not_loaded"


class Timeout(APIError):
    status, code = 504, "timeout"


class Unauthorized(APIError):
    status, code = 401, "unauthorized"


class Forbidden(APIError):
    status, code = 403, "forbidden"


class Conflict(APIError):
    status, code = 409, "conflict"


class NotFound(APIError):
    status, code = 404, "not_found"


def error_body(code: str, message: str, request_id: str | None = None) -> dict:
    """The JSON error body; ``request_id`` (also in the ``X-Request-ID`` header) finds the request in the logs."""
    error = {"code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def is_v2(path: str) -> bool:
    """Whether ``path`` is an Open Inference Protocol route (``/v2...``)."""
    return path == "/v2" or path.startswith("/v2/")


def error_content(path: str, code: str, message: str, request_id: str | None = None) -> dict:
    """A route's error body: the protocol's ``{"error": "<message>"}`` on ``/v2``, :func:`error_body` elsewhere."""
    return {"error": message} if is_v2(path) else error_body(code, message, request_id)


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """JSON bodies for our errors, FastAPI's validation errors, 404/405 and crashes."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_content(request.url.path, exc.code, exc.message, request_id_of(request)),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            error_content(request.url.path, "invalid_request", _validation_message(exc), request_id_of(request)),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(
            error_content(
                request.url.path, codes.get(exc.status_code, "http_error"), str(exc.detail), request_id_of(request)
            ),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("vitmerge.server").exception(
            "unhandled error on %s (request_id=%s)", request.url.path, request_id_of(request)
        )
        return JSONResponse(
            error_content(
                request.url.path, "internal_error", f"internal error ({type(exc).__name__})", request_id_of(request)
            ),
            status_code=500,
        )
