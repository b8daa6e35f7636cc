"""Differently-initialised zoos (issue 8): the preset, refusals, MuDSC/FS-Merge accuracy, serving.

Uses the `test-diffinit` preset (two tiny ViTs, each with its own pretraining; ~20 s).
"""

import time

import pytest
from conftest import build_in_fresh_process
from server_helpers import AsgiHarness, png_bytes

from merging.method_index import REGISTRY, run_merge
from merging.pipeline import merge_and_publish, merge_context, shares_init
from model_store.bundle import BundleStore
from model_store.settings import StoreLayout
from model_store.zoo_build.presets import build_zoo
from server.eval.joint import evaluate_joint, summary
from server.eval.taskpool import TaskPool
from server.http.settings import ServerSettings
from server.runtime.engine import Engine

TASK_VECTOR_METHODS = [
    "task_arithmetic",
    "ties",
    "dare_ta",
    "dare_ties",
    "emr",
    "emr_routed",
    "gating_avg",
    "gating_regmean",
    "tsv_c",
    "tsv_m",
    "tsv_routed",
]


@pytest.fixture(scope="module")
def diff_report(tmp_path_factory):
    return build_in_fresh_process("test-diffinit", tmp_path_factory.mktemp("diffinit") / "zoos" / "test-diffinit")


@pytest.fixture(scope="module")
def zoo(diff_report):
    return diff_report.zoo


@pytest.fixture(scope="module")
def accuracies(zoo, tmp_path_factory):
    """Per-task / joint test accuracy of a few merges of the pair (300 test images per task): each merge
    published as a bundle and evaluated through the Engine."""
    store = BundleStore(StoreLayout(tmp_path_factory.mktemp("joint")))
    pool = TaskPool.of_zoo(zoo, zoo.tasks, 300)
    out = {}
    for name, params in [
        ("avg", {}),
        ("mudsc_align", {"gate": False, "max_images": 32}),
        ("mudsc_zip", {"gate": False, "max_images": 32}),
        ("fs_merge", {"gate": False, "epochs": 4, "augment": 20}),
    ]:
        outcome = merge_and_publish(zoo, store, name, params, progress=False)
        out[name] = summary(evaluate_joint(Engine(store.load(outcome.version), "cpu"), pool))
    return out


def test_zoo_records_different_inits_and_is_cached(diff_report, zoo):
    # measured 0.857 / 0.928 (2026-12-06, seed 0); floors 0.15 / 0.2 below
    assert diff_report.test_accuracy["mnist"] > 0.7 and diff_report.test_accuracy["digits"] > 0.7
    assert zoo.manifest.shared_init is False and zoo.base == "base-mnist"
    seeds = {t: zoo.metas[t].provenance.init_seed for t in zoo.tasks}
    assert len(set(seeds.values())) == len(zoo.tasks)
    assert (zoo.root / "models" / "base-digits" / "meta.json").exists()  # every model's own pretraining is kept
    assert not shares_init(zoo)
    again = build_zoo("test-diffinit", zoo.root, progress=False)
    assert again.cached and again.zoo.manifest.config_hash == zoo.manifest.config_hash


@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
def test_task_vector_methods_refuse_a_zoo_without_shared_base(zoo, tmp_path, method):
    assert REGISTRY[method].needs_shared_base
    store = BundleStore(StoreLayout(tmp_path))
    with pytest.raises(ValueError, match="shared pretrained base"):
        merge_and_publish(zoo, store, method, {}, progress=False)
    with pytest.raises(ValueError, match="mudsc_align"):  # the message names usable methods
        run_merge(method, merge_context(zoo, zoo.tasks), {})
    assert store.current_version() is None


def test_fs_merge_and_mudsc_beat_averaging(accuracies):
    # measured (300 test images per task), per task avg / mudsc_align / mudsc_zip / fs_merge:
    #   zoo trained with float resizing, 1 thread: 5.2 / 28.7 / 30.0 / 64.8; 2 threads: 10.0 / 30.0 / 20.7 / 66.2
    #   zoo trained with Pillow-like uint8 resizing (inputs <= 1/255 apart): 8.7 / 11.5 / 12.2 / 61.5
    # MuDSC's margin over averaging swings with the zoo's training noise (the same code on the first zoo still
    # gives 30.0 / 21.2): asserted is the smallest margin seen, minus half of it
    avg = accuracies["avg"]["per_task"]
    assert avg < 0.2  # about chance
    assert accuracies["fs_merge"]["per_task"] > avg + 0.4
    assert accuracies["fs_merge"]["joint"] > accuracies["avg"]["joint"] + 0.25
    assert accuracies["mudsc_align"]["per_task"] > avg + 0.014
    assert accuracies["mudsc_zip"]["per_task"] > avg + 0.014


def _wait(h, job_id, auth, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        job = h.request("GET", f"/v1/merge/{job_id}", headers=auth).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError("merge job did not finish")


def test_server_merges_and_serves_a_diffinit_zoo(zoo, tmp_path):
    """Startup merge with MuDSC + gate, routed classify, 422 for task vectors, an admin FS-Merge hot swap."""
    settings = ServerSettings(
        store=tmp_path / "store",
        zoo=str(zoo.root),
        admin_token="s3cret",
        watch_interval_s=0,
        device="cpu",
        default_method="mudsc_align",
        default_params={"gate_epochs": 1, "gate_size": 32, "max_images": 16},
        max_wait_ms=2,
    )
    from model_store.data.builtin import load_split

    img = load_split("digits", "test", limit=1).images[0]
    auth = {"authorization": "Bearer s3cret"}
    h = AsgiHarness(settings)
    try:
        assert h.state.manager.engine.kind == "static" and h.state.manager.engine.has_gate
        r = h.request("POST", "/v1/classify", files={"image": ("x.png", png_bytes(img))})
        assert r.status_code == 200 and r.json()["predictions"][0]["task"]["source"] == "gate"
        r = h.request("POST", "/v1/merge", json={"method": "ties"}, headers=auth)
        assert r.status_code == 422 and "shared pretrained base" in r.json()["error"]["message"]
        params = {"gate": False, "epochs": 1, "augment": 2, "images": 8}
        r = h.request("POST", "/v1/merge", json={"method": "fs_merge", "params": params}, headers=auth)
        assert r.status_code == 202
        job = _wait(h, r.json()["id"], auth)
        assert job["state"] == "succeeded" and job["version"] == "v2", job
        r = h.request("POST", "/v1/classify", files={"image": ("x.png", png_bytes(img))}, data={"task": "digits"})
        assert r.status_code == 200 and r.json()["model_version"] == "v2"
    finally:
        h.close()


def test_cli_merges_with_a_new_method_and_refuses_task_vectors(zoo, tmp_path, capsys):
    from server.cli import main

    store = str(tmp_path / "store")
    assert main(["merge", "--method", "emr", "--zoo", str(zoo.root), "--store", store, "--quiet"]) == 2
    assert "shared pretrained base" in capsys.readouterr().err
    args = [
        "merge",
        "--method",
        "mudsc_zip",
        "--zoo",
        str(zoo.root),
        "--store",
        store,
        "--quiet",
        "--param",
        "gate=false",
        "--param",
        "max_images=16",
    ]
    assert main(args) == 0
    assert "published bundle v1 (mudsc_zip" in capsys.readouterr().out
    assert main(["eval", "--store", store, "--limit", "50"]) == 0
