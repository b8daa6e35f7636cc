"""Bearer-token checks: the admin token for merges, the optional API key for classify (constant-time compares)."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from server.http.errors import Forbidden, Unauthorized
from server.http.settings import ServerSettings


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
