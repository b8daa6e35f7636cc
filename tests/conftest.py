"""Shared fixtures: a real (small) zoo built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model_store.zoo_build.presets import BuildReport, build_zoo

#: test servers run the engine in the server process (the thread worker) unless a test asks for a kind: a spawned
#: engine per test server would add seconds to each; both kinds are tested where it matters (test_api, test_live,
#: test_resilience, test_server_process). The served default is the process worker (BENCHMARKS.md, issue 37).
os.environ.setdefault("VITMERGE_WORKER", "thread")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from one random state: torch's, numpy's and Python's global generators seeded with 0.

    A random tensor drawn without a generator of its own (``torch.randn(...)``) is then the same on every run,
    so a test cannot pass or fail by the draw; tests that need other draws seed their own generators.
    """
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def build_in_fresh_process(preset: str, root: Path) -> BuildReport:
    """Train a preset zoo with ``vitmerge zoo build`` in a new interpreter, then open the cached result.

    Training in the long-lived test process runs 1.3-1.9x slower than in a fresh one (measured:
    the tiny zoo's five models 216 s in the suite vs 129 s alone, same accuracies to the bit);
    a child process starts with a clean allocator and thread pool.
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "server.cli", "zoo", "build", "--preset", preset, "--out", str(root), "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    report = build_zoo(preset, root, progress=False)
    assert report.cached and report.zoo.root == root
    return report


@pytest.fixture(scope="session")
def test_zoo_report(tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    """The `test` preset zoo, trained for real on the offline datasets (~20 s)."""
    return build_in_fresh_process("test", tmp_path_factory.mktemp("store") / "zoos" / "test")


@pytest.fixture(scope="session")
def test_zoo_dir(test_zoo_report: BuildReport) -> Path:
    return test_zoo_report.zoo.root


@pytest.fixture(scope="session")
def tiny_zoo_report() -> BuildReport:
    """The real demo zoo (`tiny` preset) as `make run` gets it: copied from the package into ./store.

    The copy shipped in the package is checked against its preset and the training code by
    tests/model_store/test_zoo.py::test_the_shipped_demo_zoo_is_what_its_preset_builds.
    """
    report = build_zoo("tiny", REPO / "store" / "zoos" / "tiny", progress=False)
    assert report.cached, "the shipped demo zoo is stale: `make demo-zoo` retrains it"
    return report


@pytest.fixture(scope="session")
def server_store_template(test_zoo_report: BuildReport, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose CURRENT (v1) is a routed-EMR bundle of the `test` zoo (small gate, ~10 s)."""
    from merging.pipeline import merge_and_publish
    from model_store.bundle import BundleStore
    from model_store.settings import StoreLayout

    root = tmp_path_factory.mktemp("server-store")
    merge_and_publish(test_zoo_report.zoo, BundleStore(StoreLayout(root)), "emr_routed", SMALL_GATE, progress=False)
    return root


#: A gate that trains in seconds on the `test` zoo (accuracy is not the point in server tests):
#: one epoch at 32 px on at most 200 calibration images per task, scored on 50 test images per task.
SMALL_GATE = {"gate_epochs": 1, "gate_size": 32, "gate_max_images": 200, "gate_test_images": 50}


@pytest.fixture(scope="session")
def gated_store(test_zoo_report: BuildReport, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose CURRENT is a gating_avg (m=1) bundle of the `test` zoo, built once per session."""
    from merging.pipeline import merge_and_publish
    from model_store.bundle import BundleStore
    from model_store.settings import StoreLayout

    root = tmp_path_factory.mktemp("gated-store")
    merge_and_publish(
        test_zoo_report.zoo, BundleStore(StoreLayout(root)), "gating_avg", {"m": 1, **SMALL_GATE}, progress=False
    )
    return root


@pytest.fixture
def server_store(server_store_template: Path, tmp_path: Path) -> Path:
    """A private copy of the template store (tests may publish into it)."""
    import shutil

    dst = tmp_path / "store"
    shutil.copytree(server_store_template, dst)
    return dst
