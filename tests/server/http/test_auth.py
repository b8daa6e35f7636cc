"""Every admin route asks for the admin token and every inference route for the API key -- found by walking
the app's routes, so that a route added (or an auth dependency removed) without its check fails here.

Admin routes are the ones under an admin prefix (``/v1/merge``, ``/merge``, ``/v2/repository``), tagged
``admin`` or summarised "(admin)": no ``Authorization`` header or a wrong token is 401, no token configured
is 403. Inference routes (``.../classify``, ``.../infer``) with an API key configured answer 401 without
it or with a wrong one (``Authorization: Bearer`` or ``X-API-Key``); without one configured they never
answer 401. Authentication comes before anything else: these apps have no model loaded at all.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from server_helpers import AsgiHarness

from server.http.settings import ServerSettings

ADMIN_PREFIXES = ("/v1/merge", "/merge", "/v2/repository")
PATH_PARAMS = {"{job_id}": "0123456789ab", "{name}": "vitmerge", "{version}": "1"}


def _harness(tmp_path, **kw) -> AsgiHarness:
    """An app whose CURRENT names a bundle that is not there: it never loads a model (startup fails at once)."""
    store = tmp_path / "store"
    store.mkdir(parents=True)
    (store / "CURRENT").write_text("v1\n")
    base = dict(store=store, zoo=str(tmp_path / "no-zoo"), watch_interval_s=0, device="cpu")
    return AsgiHarness(ServerSettings(**{**base, **kw}), wait_ready=False)


class Route:
    """One route of the app as included (its full path), whatever router it came from."""

    def __init__(self, context: Any):
        self.path: str = context.path
        original = context.original_route
        self.methods: set[str] = set(getattr(original, "methods", None) or {"GET"})
        self.tags: list = list(getattr(original, "tags", None) or [])
        self.summary: str = getattr(original, "summary", None) or ""


def _routes(h: AsgiHarness) -> list[tuple[str, str, Route]]:
    """(method, concrete url, route) for every route of the app, docs included (HEAD left out)."""
    out = []
    for context in iter_route_contexts(h.app.routes):
        route = Route(context)
        url = route.path
        for param, value in PATH_PARAMS.items():
            url = url.replace(param, value)
        assert "{" not in url, f"give {route.path}'s path parameter a value in PATH_PARAMS"
        out.extend((m, url, route) for m in sorted(route.methods - {"HEAD"}))
    assert len(out) >= 20, out  # the walk sees the whole app
    return out


def _is_admin(route: Route) -> bool:
    return route.path.startswith(ADMIN_PREFIXES) or "admin" in route.tags or "(admin)" in route.summary


def _is_inference(route: Route) -> bool:
    return route.path.endswith(("/classify", "/infer"))


def _code(r) -> str | None:
    body = r.json()["error"]
    return body["code"] if isinstance(body, dict) else None  # /v2 errors are {"error": "<message>"}


@pytest.fixture
def guarded(tmp_path):
    h = _harness(tmp_path, admin_token="s3cret", api_key="k3y")
    yield h
    h.close()


def test_every_admin_route_answers_401_without_the_token_and_with_a_wrong_one(guarded):
    admin = [(m, url, r) for m, url, r in _routes(guarded) if _is_admin(r)]
    # the walk sees them all: the /v1 merge routes and their aliases, the /v2 repository extension
    assert {(m, r.path) for m, _, r in admin} >= {
        ("POST", "/v1/merge"),
        ("GET", "/v1/merge/{job_id}"),
        ("POST", "/merge"),
        ("GET", "/merge/{job_id}"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/{name}/load"),
        ("POST", "/v2/repository/models/{name}/unload"),
    }
    failures = []
    for method, url, _ in admin:
        for headers, want_code in (
            ({}, "unauthorized"),
            ({"authorization": "Basic s3cret"}, "unauthorized"),  # the right secret, the wrong scheme
            ({"x-api-key": "k3y"}, "unauthorized"),  # the API key is not an admin token
            ({"authorization": "Bearer wrong"}, "invalid_token"),
        ):
            r = guarded.request(method, url, headers=headers, json={})
            code = _code(r)
            if (
                r.status_code != 401
                or "Bearer" not in r.headers.get("www-authenticate", "")
                or code
                not in (
                    None,
                    want_code,
                )
            ):
                failures.append((method, url, headers, r.status_code, r.text[:120]))
    assert not failures, failures


def test_every_admin_route_answers_403_when_no_admin_token_is_configured(tmp_path):
    h = _harness(tmp_path, admin_token=None)
    try:
        admin = [(m, url) for m, url, r in _routes(h) if _is_admin(r)]
        assert len(admin) >= 7
        for method, url in admin:
            for headers in ({}, {"authorization": "Bearer s3cret"}):
                r = h.request(method, url, headers=headers, json={})
                assert r.status_code == 403 and _code(r) in (None, "admin_disabled"), (method, url, r.text)
                assert "VITMERGE_ADMIN_TOKEN" in r.text
    finally:
        h.close()


def test_every_inference_route_needs_the_api_key_when_one_is_configured(guarded, tmp_path):
    inference = [(m, url) for m, url, r in _routes(guarded) if _is_inference(r)]
    assert {url for _, url in inference} >= {
        "/v1/classify",
        "/classify",
        "/v2/models/vitmerge/infer",
        "/v2/models/vitmerge/versions/1/infer",
    }
    for method, url in inference:
        for headers in (
            {},
            {"x-api-key": "nope"},
            {"authorization": "Bearer nope"},
            {"authorization": "k3y"},
            {"authorization": "Bearer s3cret"},  # the admin token is not an API key
        ):
            r = guarded.request(method, url, headers=headers, json={})
            assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"], (method, url, headers, r.text)
        for headers in ({"x-api-key": "k3y"}, {"authorization": "Bearer k3y"}):  # past auth: no model here, 503
            r = guarded.request(method, url, headers=headers, json={})
            assert r.status_code == 503, (method, url, headers, r.text)
    open_app = _harness(tmp_path / "open")  # no API key configured: nothing asks for one
    try:
        for method, url, route in _routes(open_app):
            if not _is_admin(route):
                r = open_app.request(method, url, json={})
                assert r.status_code != 401, (method, url, r.text)
    finally:
        open_app.close()
