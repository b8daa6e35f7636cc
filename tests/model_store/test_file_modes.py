"""Stores are readable by a server running as another user (the image's uid 10001 on a store written by root).

safetensors creates its files 0600 whatever the umask; bundles and zoo models are published 0644
(directories 0755) so that a container, a CI user or a second service account can load them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from model_store.bundle import BundleStore
from model_store.files import PUBLISHED_DIR_MODE, PUBLISHED_FILE_MODE
from model_store.settings import StoreLayout


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_merge_publishes_world_readable_bundle_files(test_zoo_report, tmp_path):
    from merging.pipeline import merge_and_publish

    old = os.umask(0o022)
    try:
        store = BundleStore(StoreLayout(tmp_path / "store"))
        version = merge_and_publish(test_zoo_report.zoo, store, "avg", progress=False).version
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "store" / "bundles" / version)
    assert any(name.endswith(".safetensors") for name in modes)
    for name, mode in modes.items():
        is_dir = (tmp_path / "store" / "bundles" / version / name).is_dir()
        assert mode == (PUBLISHED_DIR_MODE if is_dir else PUBLISHED_FILE_MODE), (name, oct(mode))
    assert stat.S_IMODE((tmp_path / "store" / "CURRENT").stat().st_mode) & 0o044 == 0o044


def test_zoo_models_are_world_readable(test_zoo_report):
    root = test_zoo_report.zoo.root / "models"
    modes = _modes(root)
    tensors = [name for name in modes if name.endswith(".safetensors")]
    assert tensors, sorted(modes)
    for name in tensors:
        assert modes[name] == PUBLISHED_FILE_MODE, (name, oct(modes[name]))
    for name, mode in modes.items():
        if (root / name).is_dir():
            assert mode & 0o555 == 0o555, (name, oct(mode))
