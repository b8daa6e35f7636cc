"""Server behaviours under faults and load: corrupt bundles, hot swaps of multi-image requests, a full
queue, a failing batch, draining, streamed bodies, replicas on an empty store, settings precedence,
the ready message -- each asserted on what a client sees."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from server_helpers import AsgiHarness, BlockingEngine, LiveServer, png_bytes, wait_for

from model_store.bundle import BundleStore
from model_store.data.builtin import load_split
from model_store.settings import StoreLayout
from server.cli import build_parser, serve_settings
from server.http.settings import ServerSettings
from server.runtime.engine import Engine, EngineOptions

AUTH = {"authorization": "Bearer s3cret"}


def _settings(store: Path, zoo: Path, **kw) -> ServerSettings:
    base = dict(store=store, zoo=str(zoo), admin_token="s3cret", watch_interval_s=0, device="cpu", max_wait_ms=2)
    return ServerSettings(**{**base, **kw})


def _corrupt(store: Path, version: str) -> None:
    path = store / "bundles" / version / "heads.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _wait(cond, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def images():
    """A few TEST images of every task of the `test` zoo, as PNG bytes."""
    return [
        png_bytes(img)
        for task in ("mnist", "animals", "solar", "digits")
        for img in load_split(task, "test", limit=4).images
    ]


@pytest.fixture(scope="module")
def two_versions(server_store_template, test_zoo_report, tmp_path_factory) -> Path:
    """The template store (v1 = routed EMR) plus v2 = AvgMean + the same heads, published but not CURRENT."""
    import shutil

    from merging.pipeline import merge_and_publish

    root = tmp_path_factory.mktemp("two-versions")
    shutil.copytree(server_store_template, root, dirs_exist_ok=True)
    merge_and_publish(test_zoo_report.zoo, BundleStore(StoreLayout(root)), "avg", progress=False, make_current=False)
    return root


def test_corrupt_current_at_start_is_reported_and_health_stays_up(server_store, test_zoo_dir):
    _corrupt(server_store, "v1")
    h = AsgiHarness(_settings(server_store, test_zoo_dir), wait_ready=False)
    try:
        _wait(lambda: h.state.manager.state == "failed", what="startup to fail")
        r = h.request("GET", "/readyz")
        assert r.status_code == 503 and "heads.safetensors sha256 mismatch" in r.json()["error"]["message"], r.text
        assert h.request("GET", "/healthz").status_code == 200
        r = h.request("POST", "/v1/classify", content=b"x", headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
    finally:
        h.close()


def test_watcher_keeps_serving_when_current_moves_to_a_corrupt_version(two_versions, tmp_path, test_zoo_dir, images):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(two_versions, store)
    h = AsgiHarness(_settings(store, test_zoo_dir, watch_interval_s=0.05))
    manager = h.state.manager
    polls, loads = [], []
    real_poll, real_load = manager.current_changed, manager.load_and_swap

    def counted_poll():
        polls.append(1)
        return real_poll()

    def counted_load(version):
        loads.append(version)
        return real_load(version)

    manager.current_changed, manager.load_and_swap = counted_poll, counted_load  # spies: the real calls run
    try:
        assert manager.version == "v1"
        _corrupt(store, "v2")
        (store / "CURRENT").write_text("v2\n")  # another replica (or a person) points CURRENT at a broken version
        _wait(lambda: len(loads) >= 1, what="the watcher to try v2")
        seen = len(polls)
        _wait(lambda: len(polls) >= seen + 10, what="ten more polls")
        assert loads == ["v2"], loads  # tried once: a failed version is not retried in a loop
        assert manager.version == "v1"
        r = h.request("POST", "/v1/classify", files={"image": ("x.png", images[0])}, data={"task": "mnist"})
        assert r.status_code == 200 and r.json()["model_version"] == "v1"
        assert h.request("GET", "/readyz").json()["model_version"] == "v1"
    finally:
        h.close()


def _classes(store: Path, version: str, images: list[bytes], task: str) -> list[int]:
    """The class the engine of ``version`` gives each image with ``task`` given (direct engine calls)."""
    from server.http.codec import decode_image

    engine = Engine(BundleStore(StoreLayout(store)).load(version), "cpu")
    out = []
    for blob in images:
        x, _ = engine.preprocess(decode_image(blob, 1 << 24), engine.task_index(task))
        out.append(int(engine.predict(x[None], [engine.task_index(task)])[0].probabilities.argmax()))
    return out


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_hot_swap_never_mixes_versions_inside_a_multi_image_response(
    two_versions, tmp_path, test_zoo_dir, images, worker
):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(two_versions, store)
    want = {v: _classes(store, v, images, "mnist") for v in ("v1", "v2")}
    assert want["v1"] != want["v2"]  # the versions answer differently: a response mixing them would show
    h = AsgiHarness(_settings(store, test_zoo_dir, worker=worker, max_wait_ms=5, max_batch_size=8))
    body = {"images": [base64.b64encode(b).decode() for b in images], "task": "mnist"}  # 16 images > one batch of 8
    responses: list[dict] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            r = h.request("POST", "/v1/classify", json=body)
            (responses.append(r.json()) if r.status_code == 200 else errors.append(r.text))

    try:
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        _wait(lambda: len(responses) >= 3, what="traffic on v1")
        h.state.manager.load_and_swap("v2")  # the swap, under load
        n = len(responses)
        _wait(lambda: len(responses) >= n + 3, what="traffic on v2")
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        h.close()
    assert not errors, errors[:2]
    for resp in responses:
        classes = [p["class"]["index"] for p in resp["predictions"]]
        assert classes == want[resp["model_version"]], resp["model_version"]
    assert {r["model_version"] for r in responses} == {"v1", "v2"}


def test_concurrent_clients_filling_the_queue_get_429_and_the_rest_is_answered(
    server_store_template, test_zoo_dir, images
):
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir, max_queue=4, max_batch_size=64, max_wait_ms=400))
    try:

        async def burst():
            async def one(i):
                return await h.client.post(
                    "/v1/classify", files={"image": ("x.png", images[i % len(images)])}, data={"task": "digits"}
                )

            return await asyncio.gather(*(one(i) for i in range(12)))

        codes = [r.status_code for r in h.call(burst())]
        assert set(codes) == {200, 429} and codes.count(200) >= 4, (
            codes
        )  # the queue holds 4 images; the rest is refused at once
        assert (
            h.request(
                "POST", "/v1/classify", files={"image": ("x.png", images[0])}, data={"task": "digits"}
            ).status_code
            == 200
        )
    finally:
        h.close()


def test_a_failing_batch_fails_its_requests_with_500_json_and_serving_goes_on(
    server_store_template, test_zoo_dir, images
):
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir))
    try:
        engine = h.state.manager.engine
        real = engine.predict
        calls = {"n": 0}

        def flaky(*args, **kwargs):  # fault injection: the first batch blows up inside the engine
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(*args, **kwargs)

        engine.predict = flaky
        # what a client of the real server sees (Starlette answers 500, then re-raises for the server's log)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=h.app, raise_app_exceptions=False), base_url="http://testserver"
        )
        r = h.call(client.post("/v1/classify", files={"image": ("x.png", images[0])}, data={"task": "mnist"}))
        h.call(client.aclose())
        assert (
            r.status_code == 500
            and r.json()["error"]["code"] == "internal_error"
            and "RuntimeError" in r.json()["error"]["message"]
        )
        r = h.request("POST", "/v1/classify", files={"image": ("x.png", images[0])}, data={"task": "mnist"})
        assert r.status_code == 200 and calls["n"] == 2
        assert h.request("GET", "/readyz").status_code == 200
    finally:
        h.close()


def test_stop_answers_every_queued_request_and_refuses_new_ones(server_store_template, test_zoo_dir, images):
    """The lifespan's stop (what SIGTERM runs once uvicorn stops accepting): with a batch held on the worker and
    three images queued behind it, new requests get 503 while the stop waits; released, all four answer 200."""
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir, max_batch_size=1, max_wait_ms=0))
    engine = h.state.manager.engine
    blocking = BlockingEngine(engine)
    h.state.manager.engine = blocking  # the requests below pin it
    batcher = h.state.batcher
    want = [_classes(server_store_template, "v1", [img], "mnist")[0] for img in images[:4]]

    def post(img: bytes):
        return h.client.post("/v1/classify", files={"image": ("x.png", img)}, data={"task": "mnist"})

    try:
        admitted = [asyncio.run_coroutine_threadsafe(post(img), h.loop) for img in images[:4]]
        wait_for(lambda: blocking.entered.is_set() and batcher.pending == 3, what="one batch running, 3 queued")
        stop = asyncio.run_coroutine_threadsafe(h.state.stop(), h.loop)
        wait_for(lambda: batcher.stopping, what="the stop to begin")
        late = h.call(post(images[4]), timeout=15)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        assert late.headers["retry-after"] == "1"
        assert h.request("GET", "/readyz").status_code == 503  # load balancers stop sending
        assert (batcher.pending, batcher.running) == (3, 1) and not stop.done()  # the stop waits for them
        blocking.release.set()
        answers = [f.result(60) for f in admitted]
        stop.result(60)
    finally:
        blocking.release.set()
        h.close()
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert [r.json()["predictions"][0]["class"]["index"] for r in answers] == want
    assert (batcher.pending, batcher.running, batcher.decoding) == (0, 0, 0)


def test_stop_waits_for_the_batch_on_the_worker_with_nothing_queued(server_store_template, test_zoo_dir, images):
    """The last batch, taken off the queue and running, is admitted work too: the stop keeps the event loop
    serving (a round trip through it returns) and waits until the batch is answered, 200."""
    h = AsgiHarness(_settings(server_store_template, test_zoo_dir, max_batch_size=1, max_wait_ms=0))
    blocking = BlockingEngine(h.state.manager.engine)
    h.state.manager.engine = blocking
    batcher = h.state.batcher
    try:
        post = h.client.post("/v1/classify", files={"image": ("x.png", images[0])}, data={"task": "mnist"})
        admitted = asyncio.run_coroutine_threadsafe(post, h.loop)
        wait_for(lambda: blocking.entered.is_set() and batcher.running == 1, what="the batch on the worker")
        assert batcher.pending == 0  # nothing queued: only the running batch keeps the stop waiting
        stop = asyncio.run_coroutine_threadsafe(h.state.stop(), h.loop)
        wait_for(lambda: batcher.stopping, what="the stop to begin")
        h.call(asyncio.sleep(0.05), timeout=15)  # the loop still runs (a stop that gave up would block it)
        assert not stop.done() and batcher.running == 1
        blocking.release.set()
        answer = admitted.result(60)
        stop.result(60)
    finally:
        blocking.release.set()
        h.close()
    assert answer.status_code == 200, answer.text
    assert (batcher.pending, batcher.running, batcher.decoding) == (0, 0, 0)


def test_two_replicas_on_an_empty_store_merge_once_and_streamed_bodies_are_capped(test_zoo_dir, tmp_path):
    store = tmp_path / "empty"
    store.mkdir()  # the servers' logs go here; no zoos, no bundles, no CURRENT
    env = {
        "VITMERGE_DEFAULT_METHOD": "avg",
        "VITMERGE_MAX_BODY_BYTES": "65536",
    }  # a quick startup merge: the race is under test
    a = LiveServer(store, test_zoo_dir, ["--watch-interval", "0"], env=env)
    b = LiveServer(store, test_zoo_dir, ["--watch-interval", "0"], env=env)
    try:
        a.wait_ready()
        b.wait_ready()
        versions = {httpx.get(f"{s.url}/readyz", timeout=5).json()["model_version"] for s in (a, b)}
        assert versions == {"v1"} and BundleStore(StoreLayout(store)).versions() == ["v1"]  # one merge, not two
        # a streamed (chunked, no Content-Length) body over the limit is cut off with 413 while it arrives

        def chunks():
            for _ in range(64):
                yield b"\x00" * 4096  # 256 KiB > the 64 KiB limit

        r = httpx.post(f"{a.url}/v1/classify", content=chunks(), headers={"content-type": "image/png"}, timeout=30)
        assert "content-length" not in r.request.headers and r.request.headers.get("transfer-encoding") == "chunked"
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
        assert httpx.get(f"{a.url}/readyz", timeout=5).status_code == 200
    finally:
        a.terminate()
        b.terminate()


def test_flags_beat_environment_which_beats_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("VITMERGE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("VITMERGE_PORT", "9001")
    monkeypatch.setenv("VITMERGE_DEFAULT_PARAMS", '{"gate_epochs": 3}')
    args = build_parser().parse_args(["serve", "--port", "9100", "--store", str(tmp_path)])
    s = serve_settings(args)
    assert s.port == 9100  # flag over env
    assert s.max_batch_size == 7 and s.default_params == {"gate_epochs": 3}  # env over default
    assert s.max_wait_ms == ServerSettings.model_fields["max_wait_ms"].default  # neither: the default
    assert s.store == tmp_path


def test_http_stack_settings_reach_uvicorn_names_and_a_missing_one_is_refused(monkeypatch, tmp_path):
    import importlib.util

    from server.cli.serve import check_http_stack

    monkeypatch.setenv("VITMERGE_HTTP_LOOP", "asyncio")
    s = serve_settings(build_parser().parse_args(["serve", "--store", str(tmp_path)]))
    assert (s.http_loop, s.http_parser) == ("asyncio", "auto")
    check_http_stack(s)  # asyncio / auto never need anything installed
    with pytest.raises(ValidationError):
        ServerSettings(http_parser="llhttp")
    for name in ("uvloop", "httptools"):
        field = "http_loop" if name == "uvloop" else "http_parser"
        named = ServerSettings(**{field: name})
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ValueError, match=f"pip install {name}"):
                check_http_stack(named)
        else:
            check_http_stack(named)


def test_ready_message_and_examples_classify_as_their_task(server_store_template, tmp_path, test_zoo_dir):
    from server.eval.examples import ready_message, write_examples

    engine = Engine(BundleStore(StoreLayout(server_store_template)).load(), "cpu")
    examples = write_examples(engine, tmp_path / "examples")
    assert set(examples) == set(engine.tasks)
    for task, path in examples.items():
        pixels = np.asarray(Image.open(path))
        assert np.array_equal(pixels, load_split(task, "test", limit=1).images[0])  # the first held-out TEST image
    message = ready_message(engine, "http://127.0.0.1:8000", examples)
    first_task, first_path = next(iter(examples.items()))
    assert f"curl -s -F image=@{first_path} http://127.0.0.1:8000/v1/classify" in message
    assert f"-F task={first_task} -F top_k=3" in message and engine.version in message


CUDA_BATCHES = (1, 9, 33, 257)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU)")
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("kind", ["emr", "gated"])
def test_cuda_engine_matches_the_cpu_engine(server_store_template, gated_store, images, graphs, kind, monkeypatch):
    """Mixed batches (every third image names its task, the rest are routed) on CUDA == on CPU."""
    from server.http.codec import decode_image

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the gate's convolutions in full fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    bundle = BundleStore(StoreLayout(server_store_template if kind == "emr" else gated_store)).load()
    cpu, gpu = Engine(bundle, "cpu"), Engine(bundle, EngineOptions("cuda", cuda_graphs=graphs))
    gpu.warmup()
    pix = [decode_image(b, 1 << 24) for b in images]
    for n in CUDA_BATCHES:
        given = [i % len(cpu.tasks) if i % 3 == 0 else None for i in range(n)]
        pre = [cpu.preprocess(pix[i % len(pix)], given[i]) for i in range(n)]
        x = torch.stack([a for a, _ in pre])
        routed = [g for (_, g), t in zip(pre, given) if t is None]
        x_gate = torch.stack(routed) if routed else None  # type: ignore[arg-type]
        for _ in range(2):  # the second call replays the captured graphs
            want, got = cpu.predict(x, given, x_gate), gpu.predict(x, given, x_gate)
            for a, b in zip(want, got):
                assert (a.task, a.source) == (b.task, b.source), n
                torch.testing.assert_close(b.probabilities, a.probabilities, atol=1e-4, rtol=1e-3)
