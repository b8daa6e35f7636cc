"""Stores are readable by a server running as another user (the image's uid 10001 on a store written by root).

safetensors creates its files 0600 whatever the umask; bundles and zoo models are published 0644
(directories 0755) so that a container, a CI user or a second service account can load them.
"""

from __future__ import annotations

import os
import shutil
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


def _read_as_nobody(store_root: Path) -> str:
    """Load the store's CURRENT bundle (every hash verified, every tensor read) in a child running as ``nobody``.

    A forked child (no new interpreter: the venv's python may live where ``nobody`` cannot exec it) drops
    to uid/gid 65534 and runs the real :meth:`BundleStore.load`; it reports ``ok <version>`` or the error.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            store = BundleStore(StoreLayout(store_root))
            bundle = store.load()
            n = sum(
                t.numel()
                for f in bundle.manifest.files
                if f.endswith(".safetensors")
                for t in bundle.tensors(f.removesuffix(".safetensors")).values()
            )
            message = f"ok {bundle.version} {n} {store.versions()}"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            message = f"{type(e).__name__}: {e}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_a_store_published_under_umask_077_is_read_by_another_uid(test_zoo_report, tmp_path_factory):
    """A CI job or root with ``umask 077`` merges; a server running as another user loads the result."""
    import tempfile

    from merging.pipeline import merge_and_publish

    parent = Path(tempfile.mkdtemp(prefix="vitmerge-modes-"))  # a place another uid may enter, like /srv
    parent.chmod(0o755)
    old = os.umask(0o077)
    try:
        store = BundleStore(StoreLayout(parent / "store"))
        version = merge_and_publish(test_zoo_report.zoo, store, "avg", progress=False).version
    finally:
        os.umask(old)
    try:
        for path in (parent / "store", store.layout.bundles, store.layout.bundles / version):
            assert stat.S_IMODE(path.stat().st_mode) == PUBLISHED_DIR_MODE, (path, oct(path.stat().st_mode))
        for path in [store.layout.current, *(store.layout.bundles / version).iterdir()]:
            assert stat.S_IMODE(path.stat().st_mode) == PUBLISHED_FILE_MODE, (path, oct(path.stat().st_mode))
        if os.geteuid() == 0:  # as root (the set-up, CI here): really read it as another uid
            read = _read_as_nobody(parent / "store")
            assert read.startswith(f"ok {version} ") and f"['{version}']" in read, read
    finally:
        shutil.rmtree(parent)
