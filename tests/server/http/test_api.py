"""The HTTP API through httpx's ASGI transport (lifespan included): results, errors, auth, metrics."""

import base64
import json
import logging
import os
import signal
import time

import httpx
import numpy as np
import pytest
from conftest import SMALL_GATE
from server_helpers import AsgiHarness, gif_bomb, huge_png_header, image_bytes, metric_value, png_bytes

from model_store.data.builtin import load_split
from server.http.settings import ServerSettings
from server.runtime.engine import Engine

MAX_PIXELS = 320 * 320  # solar cells are 300x300
MAX_BODY = 1 << 20


def _settings(store, zoo, **kw) -> ServerSettings:
    base = dict(
        store=store,
        zoo=str(zoo),
        admin_token="s3cret",
        watch_interval_s=0,
        device="cpu",
        max_image_pixels=MAX_PIXELS,
        max_body_bytes=MAX_BODY,
        max_images=16,
        max_wait_ms=2,
    )
    return ServerSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def harness(server_store_template, test_zoo_dir):
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir))
    yield h
    h.close()


@pytest.fixture(scope="module")
def samples():
    """(task, png bytes, uint8 pixels) for a few TEST images of every task."""
    out = []
    for task in ("mnist", "animals", "solar", "digits"):
        data = load_split(task, "test", limit=3)
        out += [(task, png_bytes(img), img) for img in data.images]
    return out


def _direct(engine: Engine, img: np.ndarray, task: str | None):
    x, g = engine.preprocess(img, None if task is None else engine.task_index(task))
    return engine.predict(x[None], [None if task is None else engine.task_index(task)], None if g is None else g[None])[
        0
    ]


def _check(pred: dict, direct, engine: Engine) -> None:
    assert pred["task"]["index"] == direct.task and pred["task"]["name"] == engine.tasks[direct.task]
    assert pred["task"]["source"] == direct.source
    assert pred["task"]["probability"] == pytest.approx(direct.task_probability, abs=1e-5)
    want_p = dict(zip(engine.tasks, direct.task_probabilities.tolist()))
    assert list(pred["task"]["probabilities"]) == engine.tasks  # every task, in the served order
    assert pred["task"]["probabilities"] == pytest.approx(want_p, abs=1e-5)
    top = int(direct.probabilities.argmax())
    assert (
        pred["class"]["index"] == top and pred["class"]["label"] == engine.class_names[engine.tasks[direct.task]][top]
    )
    assert pred["class"]["probability"] == pytest.approx(float(direct.probabilities[top]), abs=1e-5)


def test_predictions_through_http_equal_direct_engine_calls(harness, samples):
    engine = harness.state.manager.engine
    for i, (task, png, img) in enumerate(samples):
        given = task if i % 2 else None
        data = {"task": given} if given else {}
        r = harness.request("POST", "/v1/classify", files={"image": ("x.png", png, "image/png")}, data=data)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == engine.version == r.headers["x-model-version"]
        _check(body["predictions"][0], _direct(engine, img, given), engine)


def test_json_base64_multi_image_and_top_k(harness, samples):
    engine = harness.state.manager.engine
    images = [base64.b64encode(png).decode() for _, png, _ in samples[:5]]
    images[1] = "data:image/png;base64," + images[1]
    r = harness.request("POST", "/v1/classify", json={"images": images, "top_k": 3})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 5
    for pred, (_, _, img) in zip(preds, samples[:5]):
        _check(pred, _direct(engine, img, None), engine)
        probs = [c["probability"] for c in pred["top_k"]]
        assert len(pred["top_k"]) == min(3, len(engine.class_names[pred["task"]["name"]])) and probs == sorted(
            probs, reverse=True
        )
        assert pred["top_k"][0] == pred["class"]


def test_raw_image_body_with_query_task_and_alias_route(harness, samples):
    task, png, img = samples[0]
    r = harness.request("POST", f"/classify?task={task}&top_k=2", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    _check(r.json()["predictions"][0], _direct(harness.state.manager.engine, img, task), harness.state.manager.engine)


def test_a_multipart_image_part_without_a_filename_is_an_image(harness, samples):
    task, png, img = samples[0]
    files = {"images": (None, png, "image/png")}  # a part without a filename: Starlette hands it over as text
    sent = httpx.Request("POST", "http://x/v1/classify", files=files, data={"task": task})
    assert b"filename" not in sent.read()
    r = harness.request("POST", "/v1/classify", files=files, data={"task": task})
    assert r.status_code == 200, r.text
    _check(r.json()["predictions"][0], _direct(harness.state.manager.engine, img, task), harness.state.manager.engine)


def test_rgb_jpeg_and_large_images_are_converted(harness, samples):
    rgb = np.stack([samples[0][2]] * 3, -1)
    big = np.kron(samples[0][2], np.ones((8, 8), dtype=np.uint8))  # 224x224, under the pixel cap
    for blob in (image_bytes(rgb, "JPEG"), image_bytes(big, "PNG"), image_bytes(rgb, "WEBP"), image_bytes(rgb, "BMP")):
        r = harness.request("POST", "/v1/classify", files={"image": ("x", blob, "application/octet-stream")})
        assert r.status_code == 200, r.text


def test_tasks_models_health_and_docs(harness):
    engine = harness.state.manager.engine
    tasks = harness.request("GET", "/v1/tasks").json()
    assert [t["name"] for t in tasks["tasks"]] == engine.tasks and tasks["gate"] is True
    assert tasks["tasks"][0]["classes"] == engine.class_names[engine.tasks[0]]
    models = harness.request("GET", "/v1/models").json()
    assert models["current"] == models["serving"] == engine.version
    assert [v["version"] for v in models["versions"]] == ["v1"] and models["versions"][0]["method"] == "emr_routed"
    assert harness.request("GET", "/healthz").json() == {"status": "ok"}
    assert harness.request("GET", "/readyz").json()["model_version"] == engine.version
    spec = harness.request("GET", "/openapi.json").json()
    assert {"/v1/classify", "/v1/merge", "/v1/merge/{job_id}", "/v1/tasks", "/v1/models"} <= set(spec["paths"])
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    # the document describes the served bundle: its tasks and version are what the server accepts
    assert body["application/json"]["schema"]["properties"]["task"]["anyOf"][0]["enum"] == engine.tasks
    assert body["application/json"]["schema"]["properties"]["images"]["maxItems"] == 16  # max_images
    ready = spec["paths"]["/v2/models/{name}/versions/{version}/ready"]["get"]["parameters"]
    assert {p["name"]: p["schema"]["enum"] for p in ready} == {"name": ["vitmerge"], "version": ["v1", "1"]}
    assert harness.request("GET", "/docs").status_code == 200


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bad_inputs(png: bytes):
    """(name, request kwargs, status, error code or None) -- every one must be refused cleanly."""
    rgb_ico = image_bytes(np.zeros((16, 16, 3), np.uint8), "ICO")
    over_cap = png_bytes(np.zeros((400, 400), np.uint8))  # 160k pixels > the 102,400 cap (Pillow warns: an error here)
    J, M = "/v1/classify", "/v1/merge"
    JSON, ADMIN = {"content-type": "application/json"}, {"authorization": "Bearer s3cret"}
    return [
        ("empty json body", dict(url=J, content=b"", headers={"content-type": "application/json"}), 422, "empty_body"),
        ("no content type", dict(url=J, content=b"abc"), 415, "unsupported_media_type"),
        (
            "text/plain",
            dict(url=J, content=b"hello", headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        (
            "xml",
            dict(url=J, content=b"<a/>", headers={"content-type": "application/xml"}),
            415,
            "unsupported_media_type",
        ),
        ("form urlencoded", dict(url=J, data={"images": "x"}), 415, "unsupported_media_type"),
        (
            "invalid json",
            dict(url=J, content=b'{"images": [', headers={"content-type": "application/json"}),
            400,
            "invalid_json",
        ),
        ("json array", dict(url=J, json=["x"]), 422, "invalid_request"),
        ("json without images", dict(url=J, json={}), 422, "invalid_request"),
        ("images not a list", dict(url=J, json={"images": "abc"}), 422, "invalid_request"),
        ("images empty", dict(url=J, json={"images": []}), 422, "invalid_request"),
        ("image not a string", dict(url=J, json={"images": [1]}), 422, "invalid_request"),
        ("invalid base64", dict(url=J, json={"images": ["!!!not base64"]}), 422, "invalid_base64"),
        ("data url without base64", dict(url=J, json={"images": ["data:image/png,abc"]}), 422, "invalid_base64"),
        (
            "data url not an image",
            dict(url=J, json={"images": ["data:text/plain;base64," + _b64(png)]}),
            422,
            "invalid_data_url",
        ),
        (
            "json nested 5000 deep",
            dict(url=J, content=b'{"images": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=JSON),
            400,
            "invalid_json",
        ),
        (
            "json nested 40 deep",
            dict(url=J, content=b'{"images": ["AAAA"], "task": ' + b"[" * 40 + b"]" * 40 + b"}", headers=JSON),
            400,
            "invalid_json",
        ),
        (
            "json 5000-digit number",
            dict(url=J, content=b'{"images": ["AAAA"], "top_k": ' + b"9" * 5000 + b"}", headers=JSON),
            400,
            "invalid_json",
        ),
        ("json NaN", dict(url=J, content=b'{"images": ["AAAA"], "top_k": NaN}', headers=JSON), 400, "invalid_json"),
        ("json not utf-8", dict(url=J, content=b'{"images": ["\xff\xfe"]}', headers=JSON), 400, "invalid_json"),
        ("merge: invalid json", dict(url=M, content=b'{"method": ', headers={**JSON, **ADMIN}), 400, "invalid_json"),
        (
            "merge: nested 5000 deep",
            dict(
                url=M,
                content=b'{"method": "avg", "params": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                headers={**JSON, **ADMIN},
            ),
            400,
            "invalid_json",
        ),
        (
            "merge: huge number",
            dict(
                url=M, content=b'{"method": "ties", "params": {"k": 1' + b"0" * 5000 + b"}}", headers={**JSON, **ADMIN}
            ),
            400,
            "invalid_json",
        ),
        (
            "merge: text/plain",
            dict(url=M, content=b"method=avg", headers={"content-type": "text/plain", **ADMIN}),
            415,
            "unsupported_media_type",
        ),
        ("merge: empty body", dict(url=M, content=b"", headers={**JSON, **ADMIN}), 422, "empty_body"),
        ("merge: json array", dict(url=M, json=["avg"], headers=ADMIN), 422, "invalid_merge_request"),
        ("merge: empty method", dict(url=M, json={"method": ""}, headers=ADMIN), 422, "invalid_merge_request"),
        (
            "merge: unknown task",
            dict(url=M, json={"method": "avg", "tasks": ["mnist", "cifar"]}, headers=ADMIN),
            422,
            "invalid_merge_request",
        ),
        ("random bytes", dict(url=J, json={"images": [_b64(bytes(range(256)) * 4)]}), 400, "invalid_image"),
        ("empty image", dict(url=J, json={"images": [""]}), 422, "invalid_request"),  # the schema says minLength 1
        (
            "empty task form field",
            dict(url=J, files={"image": ("x.png", png)}, data={"task": ""}),
            422,
            "invalid_request",
        ),
        ("empty task json field", dict(url=J, json={"images": [_b64(png)], "task": ""}), 422, "invalid_request"),
        ("truncated png", dict(url=J, json={"images": [_b64(png[: len(png) // 2])]}), 400, "invalid_image"),
        ("png signature only", dict(url=J, json={"images": [_b64(png[:8])]}), 400, "invalid_image"),
        ("huge png header", dict(url=J, json={"images": [_b64(huge_png_header())]}), 413, "image_too_large"),
        ("gif bomb", dict(url=J, json={"images": [_b64(gif_bomb())]}), 413, "image_too_large"),
        ("over pixel cap", dict(url=J, json={"images": [_b64(over_cap)]}), 413, "image_too_large"),
        ("unsupported format ico", dict(url=J, json={"images": [_b64(rgb_ico)]}), 400, "invalid_image"),
        ("10k images", dict(url=J, json={"images": ["AAAA"] * 10_000}), 413, "too_many_images"),
        ("unknown task", dict(url=J, json={"images": [_b64(png)], "task": "cifar"}), 422, "unknown_task"),
        ("task wrong type", dict(url=J, json={"images": [_b64(png)], "task": 5}), 422, "invalid_request"),
        ("negative top_k", dict(url=J, json={"images": [_b64(png)], "top_k": -1}), 422, "invalid_request"),
        ("zero top_k", dict(url=J, json={"images": [_b64(png)], "top_k": 0}), 422, "invalid_request"),
        ("top_k above 20", dict(url=J, json={"images": [_b64(png)], "top_k": 21}), 422, "invalid_request"),
        (
            "top_k not a number",
            dict(url=J, files={"image": ("a.png", png)}, data={"top_k": "abc"}),
            422,
            "invalid_request",
        ),
        ("unknown json field", dict(url=J, json={"images": [_b64(png)], "colour": "red"}), 422, "invalid_request"),
        ("unknown query param", dict(url=J + "?debug=1", json={"images": [_b64(png)]}), 422, "invalid_request"),
        (
            "unknown task in query",
            dict(url=J + "?task=nope", content=png, headers={"content-type": "image/png"}),
            422,
            "unknown_task",
        ),
        ("multipart without files", dict(url=J, files={"task": (None, "mnist")}), 422, "no_images"),
        (
            "multipart text file",
            dict(url=J, files={"image": ("a.txt", b"just text", "text/plain")}),
            400,
            "invalid_image",
        ),
        ("multipart empty file", dict(url=J, files={"image": ("a.png", b"", "image/png")}), 400, "invalid_image"),
        (
            "multipart no boundary",
            dict(url=J, content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
            400,
            "invalid_multipart",
        ),
        (
            "multipart too many files",
            dict(url=J, files=[("image", (f"{i}.png", png)) for i in range(17)]),
            413,
            "too_many_images",
        ),
        (
            "raw garbage image/png",
            dict(url=J, content=b"\x89PNG garbage", headers={"content-type": "image/png"}),
            400,
            "invalid_image",
        ),
        ("raw empty image/png", dict(url=J, content=b"", headers={"content-type": "image/png"}), 400, "invalid_image"),
        (
            "body over limit",
            dict(url=J, content=b"\0" * (MAX_BODY + 1), headers={"content-type": "image/png"}),
            413,
            "payload_too_large",
        ),
        ("GET classify", dict(url=J, method="GET"), 405, "method_not_allowed"),
        ("unknown route", dict(url="/v1/nope", method="POST", json={}), 404, "not_found"),
        (
            "unknown merge job",
            dict(url="/v1/merge/abc", method="GET", headers={"authorization": "Bearer s3cret"}),
            404,
            "unknown_job",
        ),
    ]


def test_bad_inputs_get_clear_json_4xx_and_server_keeps_serving(harness, samples, caplog):
    png = samples[0][1]
    cases = _bad_inputs(png)
    assert len(cases) >= 30
    failures = []
    caplog.set_level(logging.INFO, logger="vitmerge")
    for name, kwargs, status, code in cases:
        kwargs = dict(kwargs)
        method = kwargs.pop("method", "POST")
        r = harness.request(method, kwargs.pop("url"), **kwargs)
        try:
            body = r.json()
            ok = (
                r.status_code == status
                and set(body) == {"error"}
                and body["error"]["code"] == code
                and body["error"]["message"]
            )
            ok = ok and "Traceback" not in r.text and body["error"]["request_id"] == r.headers["x-request-id"]
        except json.JSONDecodeError:
            ok = False
        if not ok:
            failures.append(f"{name}: got {r.status_code} {r.text[:200]!r}, want {status} {code}")
    assert not failures, "\n".join(failures)
    # one access-log line per request, and no stack trace for any of them
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records if r.exc_info
    ]
    assert sum(r.name == "vitmerge.access" for r in caplog.records) >= len(cases)
    assert harness.request("GET", "/readyz").status_code == 200
    ok = harness.request("POST", "/v1/classify", files={"image": ("x.png", png)})
    assert ok.status_code == 200


def test_request_ids_are_echoed_logged_and_in_error_bodies(harness, samples, caplog):
    caplog.set_level(logging.INFO, logger="vitmerge.access")
    png = samples[0][1]
    r = harness.request(
        "POST", "/v1/classify", files={"image": ("x.png", png)}, headers={"x-request-id": "client-42.a:b"}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-42.a:b"
    r = harness.request("POST", "/v1/classify", json={"images": ["!!"]}, headers={"x-request-id": "client-43"})
    assert r.status_code == 422 and r.headers["x-request-id"] == r.json()["error"]["request_id"] == "client-43"
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "vitmerge.access"]
    assert any('"POST /v1/classify" 200' in ln and "request_id=client-42.a:b" in ln for ln in lines), lines
    assert any('"POST /v1/classify" 422' in ln and "request_id=client-43" in ln for ln in lines), lines
    # no id, or one that is not a sane token (spaces, too long): a fresh one per request
    ids = set()
    for given in (None, "has space", "x" * 129):
        r = harness.request("GET", "/healthz", headers={} if given is None else {"x-request-id": given})
        assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32 and r.headers["x-request-id"] != given
        ids.add(r.headers["x-request-id"])
    assert len(ids) == 3
    r = harness.request("GET", "/v1/nope", headers={"x-request-id": "lost-1"})
    assert r.status_code == 404 and r.json()["error"]["request_id"] == "lost-1"


def test_admin_auth(server_store, test_zoo_dir):
    h = AsgiHarness(_settings(server_store, test_zoo_dir))
    try:
        body = {"method": "nope"}
        r = h.request("POST", "/v1/merge", json=body)
        assert (
            r.status_code == 401
            and r.json()["error"]["code"] == "unauthorized"
            and r.headers["www-authenticate"] == "Bearer"
        )
        r = h.request("POST", "/v1/merge", json=body, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
        r = h.request(
            "POST", "/merge", json=body, headers={"authorization": "Basic s3cret"}
        )  # the right secret, the wrong scheme
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = h.request("POST", "/v1/merge", json=body, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith(
            "unknown merge method 'nope'; valid methods: "
        )
        r = h.request(
            "POST", "/v1/merge", json={"method": "ties", "params": {"k": 7}}, headers={"authorization": "Bearer s3cret"}
        )
        msg = r.json()["error"]["message"]
        assert (
            r.status_code == 422
            and "invalid parameters for 'ties'" in msg
            and "k: Input should be less than or equal to 1" in msg
        ), msg
        r = h.request(
            "POST", "/v1/merge", json={"method": "emr", "extra": 1}, headers={"authorization": "Bearer s3cret"}
        )
        assert (
            r.status_code == 422
            and "extra" in r.json()["error"]["message"]
            and r.json()["error"]["code"] == "invalid_merge_request"
        )
        assert not (server_store / "bundles" / "v2").exists()  # nothing of the refused requests was published
    finally:
        h.close()
    no_token = AsgiHarness(_settings(server_store, test_zoo_dir, admin_token=None))
    try:
        r = no_token.request("POST", "/v1/merge", json={"method": "emr"}, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    finally:
        no_token.close()


def test_api_key_guards_classify_when_configured(server_store_template, test_zoo_dir, samples):
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir, api_key="k3y"))
    try:
        files = {"image": ("x.png", samples[0][1])}
        for headers in ({}, {"x-api-key": "nope"}, {"authorization": "Bearer nope"}, {"authorization": "k3y"}):
            r = h.request("POST", "/v1/classify", files=files, headers=headers)
            assert (
                r.status_code == 401
                and r.json()["error"]["code"] == "unauthorized"
                and "API key" in r.json()["error"]["message"]
            ), headers
        for headers in ({"x-api-key": "k3y"}, {"authorization": "Bearer k3y"}):
            r = h.request("POST", "/v1/classify", files=files, data={"task": samples[0][0]}, headers=headers)
            assert r.status_code == 200 and r.json()["predictions"][0]["task"] == {
                "name": samples[0][0],
                "index": 0,
                "probability": 1.0,
                "source": "given",
                "probabilities": {t: float(t == samples[0][0]) for t in h.state.manager.engine.tasks},
            }, r.text
        assert h.request("GET", "/readyz").status_code == 200  # probes need no key
    finally:
        h.close()


def test_merge_job_swaps_atomically_and_failed_merge_changes_nothing(server_store, test_zoo_dir, samples):
    h = AsgiHarness(_settings(server_store, test_zoo_dir))
    auth = {"authorization": "Bearer s3cret"}
    try:
        before = sorted(p.name for p in (server_store / "bundles").iterdir())
        # tasks the zoo does not have: refused at submit time, naming them
        r = h.request("POST", "/v1/merge", json={"method": "emr", "tasks": ["mnist", "cifar"]}, headers=auth)
        assert r.status_code == 422 and "cifar" in r.json()["error"]["message"], r.text
        # a merge that fails inside the job (a gate cannot train on one image per task): nothing changes
        r = h.request(
            "POST",
            "/v1/merge",
            json={"method": "emr_routed", "params": {"gate_max_images": 1, "gate_epochs": 1}},
            headers=auth,
        )
        assert r.status_code == 202, r.text
        job = _wait_job(h, r.json()["id"], auth)
        assert job["state"] == "failed" and "at least 2" in job["error"] and job["version"] is None, job
        assert sorted(p.name for p in (server_store / "bundles").iterdir()) == before
        assert (server_store / "CURRENT").read_text().strip() == "v1" and h.state.manager.version == "v1"
        # a merge that publishes and then cannot be loaded (fault injected into the load step):
        # the published version is removed again, CURRENT and the served engine stay
        manager, real_build = h.state.manager, h.state.manager.build_engine
        loaded: list[str] = []

        def unloadable(version: str):
            loaded.append(version)
            raise RuntimeError(f"cannot load {version}")

        manager.build_engine = unloadable
        try:
            r = h.request("POST", "/v1/merge", json={"method": "avg"}, headers=auth)
            job = _wait_job(h, r.json()["id"], auth)
        finally:
            manager.build_engine = real_build
        assert job["state"] == "failed" and "cannot load" in job["error"] and loaded, job
        assert sorted(p.name for p in (server_store / "bundles").iterdir()) == before  # the published version is gone
        assert (server_store / "CURRENT").read_text().strip() == "v1" and manager.version == "v1"
        # a good one: published, CURRENT moved, swapped in
        r = h.request("POST", "/v1/merge", json={"method": "emr", "tasks": ["mnist", "digits"]}, headers=auth)
        assert r.status_code == 202 and r.json()["state"] in ("queued", "running")
        second = h.request("POST", "/v1/merge", json={"method": "avg"}, headers=auth)
        job = _wait_job(h, r.json()["id"], auth)
        assert job["state"] == "succeeded" and job["version"] == "v2" and job["progress"] == 1.0, job
        assert second.status_code in (202, 409)  # 409 while the first one still ran
        if second.status_code == 202:
            _wait_job(h, second.json()["id"], auth)
        assert (server_store / "CURRENT").read_text().strip() == h.state.manager.version
        r = h.request("POST", "/v1/classify", files={"image": ("x.png", samples[0][1])}, data={"task": "mnist"})
        assert r.status_code == 200 and r.json()["model_version"] == h.state.manager.version
        text = h.request("GET", "/metrics").text
        assert metric_value(text, "vitmerge_merge_jobs_total", 'outcome="failed"') == 2
        assert metric_value(text, "vitmerge_merge_jobs_total", 'outcome="succeeded"') >= 1
    finally:
        h.close()


def test_a_merge_process_killed_mid_merge_fails_the_job_and_serving_goes_on(server_store, test_zoo_dir, samples):
    h = AsgiHarness(_settings(server_store, test_zoo_dir))
    auth = {"authorization": "Bearer s3cret"}
    try:
        before = sorted(p.name for p in (server_store / "bundles").iterdir())
        r = h.request("POST", "/v1/merge", json={"method": "emr_routed", "params": SMALL_GATE}, headers=auth)
        assert r.status_code == 202, r.text
        job = h.state.jobs.jobs[r.json()["id"]]
        deadline = time.monotonic() + 60
        while (job.process is None or job.phase != "merging") and job.state != "failed" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.process is not None and job.process.pid != os.getpid(), job  # the merge runs in a child process
        os.kill(job.process.pid, signal.SIGKILL)  # what the kernel's OOM killer does
        done = _wait_job(h, job.id, auth)
        assert done["state"] == "failed" and "SIGKILL" in done["error"] and done["version"] is None, done
        assert (
            sorted(p.name for p in (server_store / "bundles").iterdir()) == before
        )  # no half-written version or staging dir
        assert (server_store / "CURRENT").read_text().strip() == "v1" and h.state.manager.version == "v1"
        r = h.request("POST", "/v1/classify", files={"image": ("x.png", samples[0][1])})
        assert r.status_code == 200 and r.json()["model_version"] == "v1"
        r = h.request("POST", "/v1/merge", json={"method": "avg"}, headers=auth)  # and the next merge works
        assert _wait_job(h, r.json()["id"], auth)["state"] == "succeeded"
    finally:
        h.close()


def test_second_merge_gets_409_while_one_runs(server_store, test_zoo_dir):
    h = AsgiHarness(_settings(server_store, test_zoo_dir))
    auth = {"authorization": "Bearer s3cret"}
    try:
        first = h.request("POST", "/v1/merge", json={"method": "emr_routed", "params": SMALL_GATE}, headers=auth)
        second = h.request("POST", "/v1/merge", json={"method": "avg"}, headers=auth)
        assert first.status_code == 202
        assert second.status_code == 409 and second.json()["error"]["code"] == "merge_in_progress"
        assert _wait_job(h, first.json()["id"], auth)["state"] == "succeeded"
    finally:
        h.close()


def _wait_job(h, job_id, auth, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = h.request("GET", f"/v1/merge/{job_id}", headers=auth).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def test_readyz_503_until_a_model_is_loaded(tmp_path):
    h = AsgiHarness(_settings(tmp_path / "empty-store", tmp_path / "no-such-zoo"), wait_ready=False)
    try:
        deadline = time.monotonic() + 30
        while h.state.manager.state not in ("failed",) and time.monotonic() < deadline:
            time.sleep(0.05)
        r = h.request("GET", "/readyz")
        assert (
            r.status_code == 503
            and r.json()["error"]["code"] == "not_ready"
            and "no-such-zoo" in r.json()["error"]["message"]
        )
        r = h.request("POST", "/v1/classify", content=b"x", headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
        assert h.request("GET", "/v1/tasks").status_code == 503
        assert h.request("GET", "/healthz").status_code == 200
    finally:
        h.close()


def test_queue_full_429_and_timeout_504(server_store_template, test_zoo_dir, samples):
    png = _b64(samples[0][1])
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir, max_queue=2))
    try:
        r = h.request("POST", "/v1/classify", json={"images": [png] * 3})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        assert h.request("POST", "/v1/classify", json={"images": [png] * 2}).status_code == 200
    finally:
        h.close()
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir, request_timeout_s=1e-4, max_wait_ms=50))
    try:
        r = h.request("POST", "/v1/classify", json={"images": [png]})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert h.request("GET", "/readyz").status_code == 200
    finally:
        h.close()


#: series that grow by one per image (``per="image"``), per engine batch (``per="batch"``) or per request
COUNTED = {
    ("vitmerge_requests_total", 'method="POST",route="/v1/classify",status="200"'): "request",
    ("vitmerge_request_latency_seconds_count", 'route="/v1/classify"'): "request",
    ("vitmerge_queue_wait_seconds_count", ""): "image",
    ("vitmerge_predictions_total", ""): "image",
    ("vitmerge_batch_size_sum", ""): "image",
    ("vitmerge_batch_size_count", ""): "batch",
    ("vitmerge_inference_seconds_count", ""): "batch",
}


def _counts(harness) -> dict:
    text = harness.request("GET", "/metrics").text

    def value(name: str, labels: str) -> float:
        try:
            return metric_value(text, name, labels)
        except KeyError:  # a labelled series appears with its first sample
            return 0.0

    return {key: value(*key) for key in COUNTED}


def test_metrics_count_every_request_image_and_batch(harness, samples):
    """N classifies, one at a time (one batch each), then one request of 3 images (one batch of 3)."""
    before = _counts(harness)
    n = 5
    for task, png, _ in samples[:n]:
        r = harness.request("POST", "/v1/classify", files={"image": ("x.png", png)}, data={"task": task})
        assert r.status_code == 200 and r.json()["timing"]["batch_sizes"] == [1], r.text
    after = _counts(harness)
    assert {k: after[k] - before[k] for k in COUNTED} == {k: n for k in COUNTED}
    r = harness.request("POST", "/v1/classify", json={"images": [_b64(png) for _, png, _ in samples[:3]]})
    assert r.status_code == 200 and r.json()["timing"]["batch_sizes"] == [3], r.text
    grown = {k: v - after[k] for k, v in _counts(harness).items()}
    assert grown == {k: {"request": 1, "image": 3, "batch": 1}[per] for k, per in COUNTED.items()}, grown
    text = harness.request("GET", "/metrics").text
    assert metric_value(text, "vitmerge_queue_depth") == 0  # nothing waits once every request was answered
    assert metric_value(text, "vitmerge_batch_size_bucket", 'le="2.0"') == metric_value(
        text, "vitmerge_batch_size_bucket", 'le="1.0"'
    )  # no batch of 2 ever ran here; the batch of 3 is in the le="4.0" bucket
    assert metric_value(text, "vitmerge_weight_cache_lookups_total") > 0
    assert "vitmerge_model_info{" in text and 'version="v1"' in text
    assert metric_value(text, "vitmerge_ready") == 1


def test_serving_path_does_not_import_training_code():
    import subprocess
    import sys

    code = (
        "import sys, server.http.app, server.runtime.engine, server.cli; "
        "bad = [m for m in ('merging', 'merging.registry', 'merging.gating.router', 'model_store.zoo_build.training', "
        "'model_store.zoo_build.presets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_process_worker_gives_the_same_answers_and_readyz_follows_it(server_store_template, test_zoo_dir, samples):
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir, worker="process"))
    try:
        engine = h.state.manager.engine
        assert type(engine).__name__ == "ProcessEngine" and engine.alive
        direct = Engine(engine.bundle, "cpu")
        for i, (task, png, img) in enumerate(samples[:6]):
            given = task if i % 2 else None
            r = h.request(
                "POST", "/v1/classify", files={"image": ("x.png", png)}, data={"task": given} if given else {}
            )
            assert r.status_code == 200, r.text
            _check(r.json()["predictions"][0], _direct(direct, img, given), direct)
        text = h.request("GET", "/metrics").text
        assert metric_value(text, "vitmerge_weight_cache_lookups_total") > 0  # reported back from the child
        engine._proc.kill()  # the inference process dies: not ready, classify answers 503
        engine._proc.join(5)
        assert h.request("GET", "/readyz").status_code == 503
        r = h.request("POST", "/v1/classify", files={"image": ("x.png", samples[0][1])})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
    finally:
        h.close()
