"""ASGI middleware of the server: request IDs, the body-size limit, request metrics and the access log."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

from server.http.errors import APIError, InvalidRequest, PayloadTooLarge, error_content
from server.http.state import ServerState

access_log = logging.getLogger("vitmerge.access")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")


def request_id(given: bytes | None) -> str:
    """The client's ``X-Request-ID`` when it is a sane token (<= 128 visible characters), else a new one."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given.decode()
    return uuid.uuid4().hex


class ServingMiddleware:
    """Body-size limit (413 before reading, or while streaming) + request metrics; the inference routes' fast path.

    ``fast``: routes (``POST /v1/classify``, ``/v2`` infer) whose endpoint takes only the request and path
    parameters. They are called straight from here -- no Starlette routing over every route, no FastAPI
    dependency solving, no exception-middleware layers -- with the same errors the app's handlers give
    (:func:`~server.http.errors.error_content`, 500 for a crash). Everything else goes through the app.
    """

    def __init__(self, app: Any, state: ServerState, fast: list[APIRoute] | None = None):
        self.app, self.state = app, state
        self.fast = fast if fast is not None else []

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
                await JSONResponse(
                    error_content(scope.get("path", ""), err.code, err.message, rid), status_code=err.status
                )(scope, receive, send_wrapper)
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

            fast, params = self._fast_route(scope)
            if fast is not None:
                await self._call_fast(fast, params, scope, limited_receive, send_wrapper, rid)
            else:
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

    def _fast_route(self, scope: Scope) -> tuple[APIRoute | None, dict[str, str]]:
        if scope.get("method") != "POST":
            return None, {}
        path = scope.get("path", "")
        for route in self.fast:
            match = route.path_regex.match(path)
            if match is not None:
                if scope.get("query_string") and route.dependant.query_params:
                    return None, {}  # declared query parameters (/v2's ?version=): the app validates them
                return route, match.groupdict()
        return None, {}

    async def _call_fast(
        self, route: APIRoute, params: dict[str, str], scope: Scope, receive: Receive, send: Send, rid: str
    ) -> None:
        """One fast-path request: the endpoint's Response, or its error as the app's handlers would answer it."""
        scope["route"], scope["path_params"] = route, params
        path = scope.get("path", "")
        try:
            response = await route.endpoint(Request(scope, receive), **params)
        except APIError as e:
            body = error_content(path, e.code, e.message, rid)
            response = JSONResponse(body, status_code=e.status, headers=e.headers)
        except StarletteHTTPException as e:
            body = error_content(path, "http_error", str(e.detail), rid)
            response = JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))
        except Exception as e:  # as the app's crash handler: logged, a JSON 500
            logging.getLogger("vitmerge.server").exception("unhandled error on %s (request_id=%s)", path, rid)
            message = f"internal error ({type(e).__name__})"
            response = JSONResponse(error_content(path, "internal_error", message, rid), status_code=500)
        await response(scope, receive, send)

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return route.path
        app = scope.get("app")
        for r in getattr(app, "routes", []):
            if r.matches(scope)[0] == Match.FULL:
                return getattr(r, "path", "other")
        return "unmatched"
