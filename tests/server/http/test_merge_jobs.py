"""Admin merge jobs and version switches on a full store (``keep_versions=2``, two versions present).

A merge that fails at any phase -- its bundle does not load, its warm-up fails, its process is killed
-- leaves the store's versions, ``CURRENT`` and the served engine exactly as they were (the rollback
target included); only a version that became CURRENT prunes the store. A version switch to a corrupt
version answers 422 and changes nothing; one during a merge answers 409. Outcomes are counted.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import SMALL_GATE
from server_helpers import AsgiHarness, metric_value, png_bytes

from merging.pipeline import merge_and_publish
from model_store.bundle import BundleStore
from model_store.data.builtin import load_split
from model_store.errors import BundleIntegrityError
from model_store.settings import StoreLayout
from server.http.settings import ServerSettings
from server.runtime.engine import Engine

AUTH = {"authorization": "Bearer s3cret"}
LOAD = "/v2/repository/models/vitmerge/load"


@pytest.fixture(scope="module")
def full_store_template(server_store_template, test_zoo_report, tmp_path_factory) -> Path:
    """v1 (routed EMR) and v2 (AvgMean, CURRENT): with ``keep_versions=2`` the store is full."""
    root = tmp_path_factory.mktemp("full") / "store"
    shutil.copytree(server_store_template, root)
    merge_and_publish(test_zoo_report.zoo, BundleStore(StoreLayout(root)), "avg", progress=False)
    return root


@pytest.fixture
def harness(full_store_template, tmp_path, test_zoo_dir):
    store = tmp_path / "store"
    shutil.copytree(full_store_template, store)
    settings = ServerSettings(
        store=store, zoo=str(test_zoo_dir), admin_token="s3cret", watch_interval_s=0, device="cpu", keep_versions=2
    )
    h = AsgiHarness(settings)
    yield h
    h.close()


@pytest.fixture(scope="module")
def png() -> bytes:
    return png_bytes(load_split("mnist", "test", limit=1).images[0])


def _wait_job(h: AsgiHarness, job_id: str) -> dict:
    deadline = time.monotonic() + 180  # a hang guard, not a promise
    while time.monotonic() < deadline:
        job = h.request("GET", f"/v1/merge/{job_id}", headers=AUTH).json()
        if job["state"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job_id)


def _snapshot(h: AsgiHarness, png: bytes) -> tuple:
    """What must not change: the versions on disk, CURRENT, the served engine (object), what a client gets."""
    store = h.state.manager.store
    r = h.request("POST", "/v1/classify", files={"image": ("x.png", png)}, data={"task": "mnist"})
    assert r.status_code == 200, r.text
    body = r.json()
    names = sorted(p.name for p in store.layout.bundles.iterdir())  # staging folders included
    return names, store.current_version(), id(h.state.manager.engine), body["model_version"], body["predictions"]


def test_a_failed_merge_at_any_phase_changes_nothing_on_a_full_store(harness, png, monkeypatch):
    h, store = harness, harness.state.manager.store
    assert store.versions() == ["v1", "v2"] and store.current_version() == "v2" and store.keep == 2
    before = _snapshot(h, png)
    assert before[:2] == (["v1", "v2"], "v2") and before[3] == "v2"
    real_load = store.load

    def corrupted_on_disk(version=None, verify=True):  # fault injection: the new bundle's bytes rot before its load
        if version not in (None, "v1", "v2"):
            path = next((store.layout.bundles / version).glob("*.safetensors"))
            path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        return real_load(version, verify)

    # 1. the published version does not load (a real integrity error)
    monkeypatch.setattr(store, "load", corrupted_on_disk)
    job = _wait_job(h, h.request("POST", "/v1/merge", json={"method": "avg"}, headers=AUTH).json()["id"])
    assert job["state"] == "failed" and "sha256 mismatch" in job["error"], job
    monkeypatch.setattr(store, "load", real_load)
    assert _snapshot(h, png) == before

    # 2. it loads, but its warm-up fails
    def no_warmup(self):
        raise RuntimeError("CUDA out of memory during warm-up")

    monkeypatch.setattr(Engine, "warmup", no_warmup)
    job = _wait_job(h, h.request("POST", "/v1/merge", json={"method": "avg"}, headers=AUTH).json()["id"])
    assert job["state"] == "failed" and "warm-up" in job["error"], job
    monkeypatch.undo()
    assert _snapshot(h, png) == before

    # 3. the merge process is killed mid-merge; meanwhile a version switch and a second merge get 409
    r = h.request("POST", "/v1/merge", json={"method": "emr_routed", "params": SMALL_GATE}, headers=AUTH)
    job = h.state.jobs.jobs[r.json()["id"]]
    deadline = time.monotonic() + 120  # a hang guard
    while (job.process is None or job.phase != "merging") and job.state != "failed":
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    r = h.request("POST", LOAD, json={"parameters": {"version": "v1"}}, headers=AUTH)
    assert r.status_code == 409 and "one merge at a time" in r.json()["error"], r.text
    assert h.request("POST", "/v1/merge", json={"method": "avg"}, headers=AUTH).status_code == 409
    os.kill(job.process.pid, signal.SIGKILL)
    done = _wait_job(h, job.id)
    assert done["state"] == "failed" and "SIGKILL" in done["error"], done
    assert _snapshot(h, png) == before

    # 4. a merge that succeeds: CURRENT moves, the new engine serves, and only then is the store pruned to 2
    job = _wait_job(h, h.request("POST", "/v1/merge", json={"method": "avg"}, headers=AUTH).json()["id"])
    assert job["state"] == "succeeded" and job["version"] == "v3", job
    assert store.versions() == ["v2", "v3"] and store.current_version() == "v3" == h.state.manager.version
    text = h.request("GET", "/metrics").text
    assert metric_value(text, "vitmerge_merge_jobs_total", 'outcome="failed"') == 3
    assert metric_value(text, "vitmerge_merge_jobs_total", 'outcome="succeeded"') == 1
    assert metric_value(text, "vitmerge_model_swaps_total") == 1  # the one successful merge swapped once
    r = h.request("POST", LOAD, json={"parameters": {"version": "v2"}}, headers=AUTH)  # and a switch back: one more
    assert r.status_code == 200 and h.state.manager.version == "v2" == store.current_version(), r.text
    assert metric_value(h.request("GET", "/metrics").text, "vitmerge_model_swaps_total") == 2


def test_switching_to_a_corrupt_version_answers_422_and_changes_nothing(harness, png):
    h, store = harness, harness.state.manager.store
    before = _snapshot(h, png)
    heads = store.layout.bundles / "v1" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleIntegrityError):
        store.load("v1")
    r = h.request("POST", LOAD, json={"parameters": {"version": "1"}}, headers=AUTH)
    assert r.status_code == 422 and "v1 cannot be loaded" in r.json()["error"] and "still serving v2" in r.text
    assert set(r.json()) == {"error"}
    assert _snapshot(h, png) == before
    r = h.request("POST", LOAD, json={"parameters": {"version": "v9"}}, headers=AUTH)
    assert r.status_code == 404 and _snapshot(h, png) == before
    assert metric_value(h.request("GET", "/metrics").text, "vitmerge_model_swaps_total") == 0
