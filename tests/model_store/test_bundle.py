import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from model_store.bundle import BundleStore
from model_store.errors import BundleIntegrityError
from model_store.settings import StoreLayout


def _publish(store: BundleStore, value: float, method: str = "avg") -> str:
    draft = store.draft()
    draft.add_tensors("unified", {"w": torch.full((4, 4), value), "b": torch.arange(3.0)})
    draft.add_json("tasks", {"names": ["a", "b"]})
    return store.publish(draft, method, {"lam": value}, zoo={"name": "z"}, tasks=["a", "b"])


@pytest.fixture
def store(tmp_path):
    return BundleStore(StoreLayout(tmp_path / "store"), keep=3)


def test_publish_and_load_round_trip(store):
    v1 = _publish(store, 1.0)
    v2 = _publish(store, 2.0)
    assert (v1, v2) == ("v1", "v2")
    assert store.current_version() == "v2"
    bundle = store.load()
    assert bundle.version == "v2" and bundle.manifest.params == {"lam": 2.0}
    assert torch.equal(bundle.tensors("unified")["w"], torch.full((4, 4), 2.0))
    assert bundle.json("tasks") == {"names": ["a", "b"]}
    assert set(bundle.manifest.files) == {"unified.safetensors", "tasks.json"}
    assert all(len(e.sha256) == 64 for e in bundle.manifest.files.values())
    assert not list(store.layout.bundles.glob(".staging-*"))


def test_tampered_file_is_refused(store):
    v = _publish(store, 1.0)
    path = store.layout.bundles / v / "unified.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="unified.safetensors sha256 mismatch"):
        store.load(v)


def test_truncated_missing_and_partial_bundles_are_refused(store):
    v = _publish(store, 1.0)
    path = store.layout.bundles / v / "unified.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(BundleIntegrityError, match="bytes"):
        store.load(v)
    path.unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        store.load(v)
    (store.layout.bundles / "v7").mkdir()
    with pytest.raises(BundleIntegrityError, match="manifest.json is missing"):
        store.load("v7")
    with pytest.raises(BundleIntegrityError, match="not a bundle version"):
        store.load("../etc")


def test_empty_store_has_no_current(store):
    assert store.current_version() is None and store.versions() == []
    with pytest.raises(BundleIntegrityError, match="no CURRENT"):
        store.load()


def _publish_not_current(store: BundleStore, value: float) -> str:
    draft = store.draft()
    draft.add_tensors("unified", {"w": torch.full((2,), value)})
    return store.publish(draft, "avg", {"lam": value}, make_current=False)


def test_retention_keeps_last_k_and_never_the_current(store):
    for i in range(5):
        _publish(store, float(i))
    assert store.versions() == ["v3", "v4", "v5"]  # keep = 3
    # versions published beside CURRENT prune nothing (they are not proven yet) ...
    _publish_not_current(store, 9.0)  # v6
    _publish_not_current(store, 10.0)  # v7
    assert store.versions() == ["v3", "v4", "v5", "v6", "v7"]
    # ... a version becoming CURRENT does: rolled back to v3, outside the newest 3 (v5-v7) but CURRENT
    store.set_current("v3")
    assert store.versions() == ["v3", "v5", "v6", "v7"] and store.current_version() == "v3"
    assert store.load().manifest.params == {"lam": 2.0}  # still loadable, untouched
    store.set_current("v7")  # v3 is no longer CURRENT and goes
    assert store.versions() == ["v5", "v6", "v7"]


def test_a_version_published_beside_current_deletes_no_rollback_target_until_it_is_current(tmp_path):
    """keep=2 with two versions: a merge job publishes v3 without moving CURRENT, its load fails and the
    job removes it; the store must be exactly as before (v1, the rollback target, included)."""
    store = BundleStore(StoreLayout(tmp_path / "store"), keep=2)
    _publish(store, 1.0)
    _publish(store, 2.0)
    assert _publish_not_current(store, 3.0) == "v3"
    assert store.versions() == ["v1", "v2", "v3"] and store.current_version() == "v2"
    store.remove("v3")  # what a merge job does when v3 does not load
    assert store.versions() == ["v1", "v2"] and store.current_version() == "v2"
    assert store.load("v1").manifest.params == {"lam": 1.0}
    again = _publish_not_current(store, 4.0)  # the next merge loads fine: CURRENT moves, then the store is pruned
    assert store.versions() == ["v1", "v2", again]
    store.set_current(again)
    assert store.versions() == ["v2", again] and store.current_version() == again


def test_rollback_refuses_a_corrupt_version(store):
    _publish(store, 1.0)
    _publish(store, 2.0)
    (store.layout.bundles / "v1" / "tasks.json").write_text("{}")
    with pytest.raises(BundleIntegrityError):
        store.set_current("v1")
    assert store.current_version() == "v2"


def test_failure_inside_publish_discards_the_draft_and_changes_nothing(store):
    _publish(store, 1.0)
    before = sorted(p.name for p in store.layout.bundles.iterdir())
    draft = store.draft()
    draft.add_tensors("unified", {"w": torch.zeros(2)})
    with pytest.raises(Exception, match="serializ"):  # the manifest cannot be written: publish fails inside its lock
        store.publish(draft, "avg", {"not json": object()})
    assert sorted(p.name for p in store.layout.bundles.iterdir()) == before  # no staging dir, no new version
    assert store.versions() == ["v1"] and store.current_version() == "v1"
    assert _publish(store, 2.0) == "v2"  # the version number was not used up


def test_concurrent_publishes_get_distinct_versions(store):
    out: list[str] = []
    threads = [threading.Thread(target=lambda i=i: out.append(_publish(store, float(i)))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out, key=lambda v: int(v[1:])) == ["v1", "v2", "v3", "v4"]
    store.load()


_CRASH = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from model_store.bundle import BundleStore
    from model_store.settings import StoreLayout
    store = BundleStore(StoreLayout(Path(sys.argv[1])), keep=3)
    draft = store.draft()
    draft.add_tensors("unified", {"w": torch.full((4, 4), 9.0)})
    stage = sys.argv[2]
    if stage == "rename":      # die while moving the staged dir into place
        Path.rename = lambda self, target: os._exit(137)
    elif stage == "pointer":   # die while switching CURRENT (bundle already renamed)
        os.replace = lambda a, b: os._exit(137)
    elif stage == "fsync":     # die while syncing the staged files
        os.fsync = lambda fd: os._exit(137)
    store.publish(draft, "avg")
    """
)


@pytest.mark.parametrize("stage", ["fsync", "rename", "pointer"])
def test_crash_mid_publish_leaves_current_intact(store, stage):
    _publish(store, 1.0)
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(store.layout.root), stage], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 137, proc.stderr
    assert store.current_version() == "v1"
    bundle = store.load()
    assert torch.equal(bundle.tensors("unified")["w"], torch.full((4, 4), 1.0))
    # the next publish still works and cleans nothing it should not
    assert _publish(store, 3.0) in ("v2", "v3")
    assert store.load().manifest.params == {"lam": 3.0}


def test_manifest_extra_is_typed_and_reads_older_manifests():
    """``extra``: the method's info, data records, gate accuracy, agreement -- validated; keys of older
    manifests land in ``legacy``; unset fields stay out of the JSON."""
    import json

    from pydantic import ValidationError

    from model_store.schema import ManifestExtra

    record = {"source": {"kind": "builtin", "location": "mnist"}, "images": 3, "sha256": "0" * 64}
    old = {"rescalers": {"a": 0.5}, "data": {"a": {"calibration": None, "test": record}}, "params": {"x": 1}}
    extra = ManifestExtra.model_validate(old)
    assert extra.rescalers == {"a": 0.5} and extra.legacy == {"params": {"x": 1}}
    assert extra.data is not None and extra.data["a"].test is not None and extra.data["a"].test.images == 3
    dumped = json.loads(extra.model_dump_json())
    assert dumped["extra_format"] == 1 and "rank_fraction" not in dumped and "agreement" not in dumped
    assert ManifestExtra.model_validate(dumped) == extra  # what is written reads back the same
    with pytest.raises(ValidationError):
        ManifestExtra.model_validate({"data": {"a": {"test": {**record, "images": -1}}}})
    with pytest.raises(ValidationError):
        ManifestExtra.model_validate({"rescalers": {"a": "big"}})
