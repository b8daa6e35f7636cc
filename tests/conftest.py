"""Shared fixtures: a real (small) zoo built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from model_store.presets import BuildReport, build_zoo


@pytest.fixture(scope="session")
def test_zoo_report(tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    """The `test` preset zoo, trained for real on the offline datasets (~25 s)."""
    root = tmp_path_factory.mktemp("store") / "zoos" / "test"
    return build_zoo("test", root, progress=False)


@pytest.fixture(scope="session")
def test_zoo_dir(test_zoo_report: BuildReport) -> Path:
    return test_zoo_report.zoo.root


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_zoo_report() -> BuildReport:
    """The real demo zoo (`tiny` preset), shared with `make run` through ./store (built once, ~3 min)."""
    return build_zoo("tiny", REPO / "store" / "zoos" / "tiny", progress=False)
