"""The Open Inference Protocol (/v2) against a real `vitmerge serve`, through Triton's own client.

Answers must equal /v1/classify's for the same images (task given and routed; binary and JSON tensors);
bad tensors get a 4xx with the protocol's ``{"error": "..."}`` body; the repository extension lists
versions and switches CURRENT through the same hot swap as a merge.
"""

import base64
import gzip
import json
import shutil
import struct

import httpx
import numpy as np
import pytest
import torch
from server_helpers import AsgiHarness, LiveServer, metric_value, png_bytes, require

from merging.pipeline import merge_and_publish
from model_store.bundle import BundleStore
from model_store.data.builtin import load_split
from model_store.settings import StoreLayout
from server.http.settings import ServerSettings
from server.runtime.engine import Engine

httpclient = require("tritonclient.http", "pip install 'tritonclient[http]'")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the import check

ADMIN = {"authorization": "Bearer s3cret"}
TASKS = ("mnist", "animals", "solar", "digits")


@pytest.fixture(scope="module")
def two_version_store(server_store_template, test_zoo_report, tmp_path_factory):
    """The template store (v1: routed EMR, CURRENT) plus v2, a static AvgMean bundle (not CURRENT)."""
    root = tmp_path_factory.mktemp("v2") / "store"
    shutil.copytree(server_store_template, root)
    merge_and_publish(test_zoo_report.zoo, BundleStore(StoreLayout(root)), "avg", progress=False, make_current=False)
    return root


@pytest.fixture(scope="module")
def server(two_version_store, test_zoo_dir):
    live = LiveServer(two_version_store, test_zoo_dir, ["--watch-interval", "0"])
    try:
        live.wait_ready()
        yield live
    finally:
        live.terminate()


@pytest.fixture(scope="module")
def triton(server):
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def samples():
    """(task, png bytes) of held-out TEST images, 3 per task."""
    return [(t, png_bytes(img)) for t in TASKS for img in load_split(t, "test", limit=3).images]


def _v1(url: str, png: bytes, task: str | None, top_k: int = 1) -> dict:
    data = {"top_k": str(top_k), **({"task": task} if task else {})}
    r = httpx.post(f"{url}/v1/classify", files={"image": ("x.png", png, "image/png")}, data=data, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def _inputs(pngs: list[bytes], tasks: list[str], binary: bool):
    image = httpclient.InferInput("IMAGE", [len(pngs)], "BYTES")
    blobs = pngs if binary else [base64.b64encode(p) for p in pngs]  # JSON BYTES are text: images as base64
    image.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=binary)
    task = httpclient.InferInput("TASK", [len(tasks)], "BYTES")
    task.set_data_from_numpy(np.array([t.encode() for t in tasks], dtype=np.object_), binary_data=binary)
    return [image, task]


def test_health_and_metadata_through_tritonclient(triton, server):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("vitmerge") and triton.is_model_ready("vitmerge", "1")
    assert not triton.is_model_ready("vitmerge", "2")  # in the store, not loaded
    meta = triton.get_server_metadata()
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    model = triton.get_model_metadata("vitmerge")
    assert model["versions"] == ["v1", "v2"] and model["platform"] == "vitmerge_pytorch"
    assert [i["name"] for i in model["inputs"]] == ["IMAGE", "PIXELS", "TASK"]
    assert {o["name"]: o["datatype"] for o in model["outputs"]} == {
        "TASK": "BYTES",
        "TASK_PROBABILITY": "FP32",
        "CLASS_INDEX": "INT64",
        "CLASS_LABEL": "BYTES",
        "CLASS_PROBABILITY": "FP32",
        "PROBABILITIES": "FP32",
    }
    assert model["parameters"]["tasks"] == list(TASKS) and model["parameters"]["gate"] is True
    pixels = next(i for i in model["inputs"] if i["name"] == "PIXELS")
    prep = model["parameters"]["preprocessing"]
    assert pixels["shape"] == [-1, prep["channels"], prep["size"], prep["size"]]
    assert triton.get_model_metadata("vitmerge", "v1")["name"] == "vitmerge"
    with pytest.raises(InferenceServerException, match="unknown model 'resnet'"):
        triton.get_model_metadata("resnet")
    r = httpx.get(f"{server.url}/v2/models/vitmerge/versions/v7")
    assert r.status_code == 404 and set(r.json()) == {"error"} and "v1, v2" in r.json()["error"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_v1_classify_task_given_and_routed(triton, server, samples, binary):
    for routed in (False, True):
        tasks = ["" if routed else t for t, _ in samples]
        pngs = [p for _, p in samples]
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=binary)
            for n in ("TASK", "TASK_PROBABILITY", "CLASS_INDEX", "CLASS_LABEL", "CLASS_PROBABILITY", "PROBABILITIES")
        ]
        result = triton.infer("vitmerge", _inputs(pngs, tasks, binary), outputs=outputs, request_id="req-7")
        response = result.get_response()
        assert response["id"] == "req-7" and response["model_version"] == "v1"
        probs = result.as_numpy("PROBABILITIES")
        for i, ((task, png), given) in enumerate(zip(samples, tasks)):
            want = _v1(server.url, png, given or None, top_k=20)
            name = result.as_numpy("TASK")[i]
            assert (name.decode() if isinstance(name, bytes) else name) == want["task"]["name"]
            assert result.as_numpy("TASK_PROBABILITY")[i] == pytest.approx(want["task"]["probability"], abs=1e-4)
            assert int(result.as_numpy("CLASS_INDEX")[i]) == want["class"]["index"]
            label = result.as_numpy("CLASS_LABEL")[i]
            assert (label.decode() if isinstance(label, bytes) else label) == want["class"]["label"]
            assert result.as_numpy("CLASS_PROBABILITY")[i] == pytest.approx(want["class"]["probability"], abs=1e-4)
            for c in want["top_k"]:
                assert probs[i, c["index"]] == pytest.approx(c["probability"], abs=1e-4)
            assert probs[i].sum() == pytest.approx(1.0, abs=1e-4)
            if not routed:
                assert want["task"]["name"] == task


def test_default_outputs_are_binary_when_tritonclient_names_none(triton, samples):
    """tritonclient without ``outputs`` asks binary_data_output: the five standard outputs, in binary."""
    result = triton.infer("vitmerge", _inputs([samples[0][1]], ["mnist"], True))
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["TASK", "TASK_PROBABILITY", "CLASS_INDEX", "CLASS_LABEL", "CLASS_PROBABILITY"]
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_plain_json_request_as_the_kserve_docs_show_it(server, samples):
    task, png = samples[4]
    body = {
        "id": "42",
        "parameters": {"top_k": 3},
        "inputs": [
            {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png).decode()]},
            {"name": "TASK", "shape": [1], "datatype": "BYTES", "data": [task]},
        ],
    }
    r = httpx.post(f"{server.url}/v2/models/vitmerge/infer", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "42" and r.json()["model_name"] == "vitmerge"
    want = _v1(server.url, png, task, top_k=3)
    assert out["CLASS_LABEL"]["data"] == [want["class"]["label"]] and out["TASK"]["data"] == [task]
    assert out["PROBABILITIES"]["shape"] == [1, 3] and out["PROBABILITIES"]["datatype"] == "BYTES"
    for entry, c in zip(out["PROBABILITIES"]["data"], want["top_k"]):
        p, index, label = entry.split(":", 2)
        assert (int(index), label) == (c["index"], c["label"]) and float(p) == pytest.approx(c["probability"], 1e-4)
    # the same request gzip-compressed, as tritonclient's request_compression_algorithm sends it
    r2 = httpx.post(
        f"{server.url}/v2/models/vitmerge/versions/1/infer",
        content=gzip.compress(json.dumps(body).encode()),
        headers={"content-encoding": "gzip", "content-type": "application/json"},
        timeout=60,
    )
    assert r2.status_code == 200 and r2.json()["outputs"] == r.json()["outputs"]


def test_pixels_input_matches_image_input(triton, server, two_version_store, samples):
    engine = Engine(BundleStore(StoreLayout(two_version_store)).load("v1"), "cpu")
    from model_store.data.decode import decode_image

    arrays = [decode_image(p, 1 << 24) for _, p in samples]
    pixels = np.stack(
        [engine.preprocess(a, engine.task_index(t))[0].numpy() for a, (t, _) in zip(arrays, samples)]
    ).astype(np.float32)
    for tasks in ([t for t, _ in samples], [""] * len(samples)):
        x = httpclient.InferInput("PIXELS", list(pixels.shape), "FP32")
        x.set_data_from_numpy(pixels)
        t = httpclient.InferInput("TASK", [len(tasks)], "BYTES")
        t.set_data_from_numpy(np.array(tasks, dtype=np.object_))
        from_pixels = triton.infer("vitmerge", [x, t])
        from_images = triton.infer("vitmerge", _inputs([p for _, p in samples], tasks, True))
        same_task = from_pixels.as_numpy("TASK") == from_images.as_numpy("TASK")
        if tasks[0]:  # task given: the ViT sees exactly the same input
            assert same_task.all()
            np.testing.assert_array_equal(from_pixels.as_numpy("CLASS_INDEX"), from_images.as_numpy("CLASS_INDEX"))
            np.testing.assert_allclose(
                from_pixels.as_numpy("CLASS_PROBABILITY"), from_images.as_numpy("CLASS_PROBABILITY"), atol=1e-5
            )
        else:  # routed: the gate's input is re-made from the ViT's pixels (renormalise), not from the image
            from model_store.data.preprocessing import renormalise

            assert engine.gate_preprocessing is not None
            gate_x = renormalise(torch.from_numpy(pixels), engine.preprocessing, engine.gate_preprocessing)
            p, _ = engine.route([None] * len(samples), gate_x)
            want = np.array([engine.tasks[i] for i in p.argmax(-1).tolist()], dtype=object)
            np.testing.assert_allclose(from_pixels.as_numpy("TASK_PROBABILITY"), p.max(-1).values.numpy(), atol=1e-4)
            assert (from_pixels.as_numpy("TASK").astype(str) == want.astype(str)).all()
            # and the image's own gate input routes mostly alike (a weak test gate: 7 of 12 measured on an AMD EPYC)
            assert same_task.mean() >= 0.5, from_pixels.as_numpy("TASK")


def _raw(url: str, body: bytes, headers: dict | None = None, path: str = "/v2/models/vitmerge/infer"):
    return httpx.post(url + path, content=body, headers=headers or {}, timeout=60)


def _binary_request(header: dict, *chunks: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + b"".join(chunks), {"Inference-Header-Content-Length": str(len(text))}


def _bytes_tensor(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def test_bad_tensors_get_a_4xx_with_the_protocol_error_body(server, samples):
    png = samples[0][1]
    b64 = base64.b64encode(png).decode()
    image = {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [b64]}
    ok_raw = _bytes_tensor(png)
    cases = {
        "not json": (b"{nope", {}, 400, "not valid JSON"),
        "no inputs": (json.dumps({"inputs": []}).encode(), {}, 400, "inputs"),
        "missing image": (
            json.dumps({"inputs": [{"name": "TASK", "shape": [1], "datatype": "BYTES", "data": ["mnist"]}]}).encode(),
            {},
            400,
            "exactly one of the inputs IMAGE",
        ),
        "wrong datatype": (
            json.dumps({"inputs": [{**image, "datatype": "FP32", "data": [1.0]}]}).encode(),
            {},
            400,
            "must be BYTES",
        ),
        "shape/data mismatch": (json.dumps({"inputs": [{**image, "shape": [2]}]}).encode(), {}, 400, "needs 2"),
        "unknown input": (
            json.dumps({"inputs": [image, {**image, "name": "LABEL"}]}).encode(),
            {},
            400,
            "unknown input(s) LABEL",
        ),
        "undecodable image": (
            json.dumps({"inputs": [{**image, "data": [base64.b64encode(b"not an image").decode()]}]}).encode(),
            {},
            400,
            "IMAGE[0]",
        ),
        "not base64": (json.dumps({"inputs": [{**image, "data": ["@@@"]}]}).encode(), {}, 400, "base64"),
        "unknown task": (
            json.dumps(
                {"inputs": [image, {"name": "TASK", "shape": [1], "datatype": "BYTES", "data": ["cifar"]}]}
            ).encode(),
            {},
            422,
            "unknown task 'cifar'",
        ),
        "unknown output": (
            json.dumps({"inputs": [image], "outputs": [{"name": "LOGITS"}]}).encode(),
            {},
            400,
            "unknown output 'LOGITS'",
        ),
        "pixels of the wrong size": (
            json.dumps(
                {"inputs": [{"name": "PIXELS", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [0.0] * 12}]}
            ).encode(),
            {},
            400,
            "PIXELS' must be FP32 of shape",
        ),
        "bad compression": (b"plain", {"content-encoding": "gzip"}, 400, "not valid gzip"),
        "unknown compression": (b"{}", {"content-encoding": "br"}, 415, "Content-Encoding 'br'"),
        "header length past the body": (b"{}", {"Inference-Header-Content-Length": "999"}, 400, "not a length"),
    }
    size = len(ok_raw)
    binary = {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}
    cases["binary size past the end"] = (*_binary_request({"inputs": [binary]}, ok_raw[:-3]), 400, "runs past the end")
    cases["bytes after the inputs"] = (*_binary_request({"inputs": [binary]}, ok_raw + b"xx"), 400, "2 bytes of binary")
    cases["truncated BYTES element"] = (
        *_binary_request({"inputs": [{**binary, "parameters": {"binary_data_size": 6}}]}, ok_raw[:6]),
        400,
        "runs past the end of its data",
    )
    for label, (body, headers, status, needle) in cases.items():
        r = _raw(server.url, body, headers)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert set(r.json()) == {"error"} and needle in r.json()["error"], (label, r.json())
    good, headers = _binary_request({"inputs": [binary]}, ok_raw)
    assert _raw(server.url, good, headers).status_code == 200  # the same request, well formed: still serving
    assert _raw(server.url, good, headers, "/v2/models/other/infer").status_code == 404
    r = _raw(server.url, good, headers, "/v2/models/vitmerge/versions/2/infer")
    assert r.status_code == 400 and "in the store but not loaded" in r.json()["error"]
    assert _raw(server.url, good, headers, "/v2/models/vitmerge/versions/9/infer").status_code == 404
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(
        metrics, "vitmerge_requests_total", 'method="POST",route="/v2/models/{name}/infer",status="400"'
    )


def test_repository_index_load_and_unload(server, triton, two_version_store, samples):
    r = httpx.post(f"{server.url}/v2/repository/index")
    assert r.status_code == 401 and set(r.json()) == {"error"}
    index = triton.get_model_repository_index(headers=ADMIN)
    assert [(m["version"], m["state"]) for m in index] == [("v1", "READY"), ("v2", "UNAVAILABLE")]
    store = BundleStore(StoreLayout(two_version_store))
    load = f"{server.url}/v2/repository/models/vitmerge/load"
    r = httpx.post(load, json={"parameters": {"version": "v9"}}, headers=ADMIN)
    assert r.status_code == 404 and "v1, v2" in r.json()["error"] and store.current_version() == "v1"
    r = httpx.post(load, json={"parameters": {"version": "2"}}, headers=ADMIN, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == "v2", r.text
    assert store.current_version() == "v2"  # CURRENT moved: every replica watching the store follows
    assert triton.is_model_ready("vitmerge", "v2") and not triton.is_model_ready("vitmerge", "v1")
    result = triton.infer("vitmerge", _inputs([samples[0][1]], ["mnist"], True))
    assert result.get_response()["model_version"] == "v2"
    with pytest.raises(InferenceServerException, match="no gate"):  # the static bundle cannot route
        triton.infer("vitmerge", _inputs([samples[0][1]], [""], True))
    with pytest.raises(InferenceServerException, match="cannot be unloaded"):
        triton.unload_model("vitmerge", headers=ADMIN)
    store.set_current("v1")  # someone moved CURRENT back: load without a version serves CURRENT
    triton.load_model("vitmerge", headers=ADMIN)
    assert triton.is_model_ready("vitmerge", "v1") and store.current_version() == "v1"


def test_api_key_and_body_limit_apply_to_v2(server_store_template, test_zoo_dir, samples):
    settings = ServerSettings(
        store=server_store_template,
        zoo=str(test_zoo_dir),
        watch_interval_s=0,
        device="cpu",
        api_key="k3y",
        max_body_bytes=4096,
        max_images=2,
        model_name="digits-and-more",
    )
    h = AsgiHarness(settings)
    try:
        body = {
            "inputs": [
                {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(samples[0][1]).decode()]}
            ]
        }
        url = "/v2/models/digits-and-more/infer"
        r = h.request("POST", url, json=body)
        assert r.status_code == 401 and set(r.json()) == {"error"}
        r = h.request("POST", url, json=body, headers={"x-api-key": "k3y"})
        assert r.status_code == 200, r.text
        r = h.request("POST", url, content=b"{" + b" " * 5000 + b"}", headers={"x-api-key": "k3y"})
        assert r.status_code == 413 and set(r.json()) == {"error"}
        # a gzip bomb: ~1.5 KB on the wire, 1 MB once inflated -- refused while inflating, past max_body_bytes
        bomb = gzip.compress(json.dumps({**body, "pad": " " * 2**20}).encode())
        assert len(bomb) < 4096
        r = h.request("POST", url, content=bomb, headers={"x-api-key": "k3y", "content-encoding": "gzip"})
        assert r.status_code == 413 and "decompressed body is above the limit of 4096 bytes" in r.json()["error"]
        small = gzip.compress(json.dumps(body).encode())  # the same request, compressed and small: served
        r = h.request("POST", url, content=small, headers={"x-api-key": "k3y", "content-encoding": "gzip"})
        assert r.status_code == 200, r.text
        three = {"inputs": [{**body["inputs"][0], "shape": [3], "data": body["inputs"][0]["data"] * 3}]}
        r = h.request("POST", url, json=three, headers={"x-api-key": "k3y"})  # max_images = 2
        assert r.status_code == 413 and r.json() == {"error": "3 images in one request; the limit is 2"}, r.text
        assert h.request("GET", "/v2/models/vitmerge").status_code == 404
        assert h.request("GET", "/v1/tasks").status_code == 200  # /v1 keeps its own error form and routes
        assert "code" in h.request("POST", "/v1/classify", json={"images": []}).json()["error"]
    finally:
        h.close()
