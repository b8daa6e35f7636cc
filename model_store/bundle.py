"""Merged bundles: immutable, versioned, hash-verified, published atomically.

A bundle is a directory ``store/bundles/v<N>/`` holding safetensors files and a
``manifest.json`` with the sha256 of every file. Publishing:

1. files are written into ``store/bundles/.staging-<uuid>/`` (a :class:`BundleDraft`);
2. under the store's file lock the next version number is taken, the manifest is
   written, every file is made world-readable (0644, directories 0755: a server running as
   another user reads it, whatever the umask of the writer; ``CURRENT`` too) and every file and
   the directory are fsynced;
3. the staging directory is renamed to ``v<N>`` (atomic on one filesystem);
4. ``store/CURRENT`` is replaced atomically (write temp, fsync, ``os.replace``);
5. versions beyond the newest ``keep`` are deleted (never the current one) -- only once a version
   became CURRENT (here or in :meth:`BundleStore.set_current`): a version published without moving
   ``CURRENT`` may still fail to load, and its removal must leave the store as it was.

A crash before step 4 leaves the old ``CURRENT`` and its bundle untouched. Loading
verifies every hash and refuses a corrupt or partial bundle.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from model_store.errors import BundleIntegrityError
from model_store.files import (
    PUBLISHED_FILE_MODE,
    atomic_write_text,
    fsync_path,
    make_world_readable,
    mkdir_published,
    sha256_file,
    utc_timestamp,
)
from model_store.schema import BundleManifest, FileEntry, ManifestExtra
from model_store.settings import StoreLayout

MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d+)$")
STAGING_PREFIX = ".staging-"
STALE_STAGING_SECONDS = 3600.0


def version_number(version: str) -> int:
    m = _VERSION_RE.match(version)
    if not m:
        raise ValueError(f"not a bundle version: '{version}' (expected v<N>)")
    return int(m.group(1))


class BundleDraft:
    """A bundle being written in a staging directory; nothing is visible until published."""

    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir(parents=True)

    def add_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        """Write a safetensors file ``<name>.safetensors``."""
        path = self.path / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)
        return path

    def add_json(self, name: str, obj: Any) -> Path:
        """Write ``<name>.json`` (small structured data: class names, gate config...)."""
        path = self.path / f"{name}.json"
        path.write_text(json.dumps(obj, indent=2) + "\n")
        return path

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.name != MANIFEST)

    def preview(self, method: str, params: dict[str, Any] | None = None, tasks: list[str] | None = None) -> Bundle:
        """The draft as a :class:`Bundle` (version ``draft``, files not hashed) to evaluate before publishing."""
        files = {p.name: FileEntry(sha256="0" * 64, bytes=p.stat().st_size) for p in self.files()}
        manifest = BundleManifest(
            version="draft", method=method, params=params or {}, tasks=tasks or [], created_at=utc_timestamp(),
            files=files,
        )  # fmt: skip
        return Bundle(self.path, manifest)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class Bundle:
    """A verified, loaded bundle; tensors are read through safetensors memory maps."""

    path: Path
    manifest: BundleManifest
    _cache: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def version(self) -> str:
        return self.manifest.version

    def has(self, name: str) -> bool:
        return f"{name}.safetensors" in self.manifest.files

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """All tensors of ``<name>.safetensors`` (memory-mapped)."""
        if name not in self._cache:
            if not self.has(name):
                raise KeyError(
                    f"bundle {self.version} has no '{name}.safetensors' (files: {sorted(self.manifest.files)})"
                )
            with safe_open(self.path / f"{name}.safetensors", framework="pt") as f:
                self._cache[name] = {k: f.get_tensor(k) for k in f.keys()}
        return self._cache[name]

    def json(self, name: str) -> Any:
        if f"{name}.json" not in self.manifest.files:
            raise KeyError(f"bundle {self.version} has no '{name}.json'")
        return json.loads((self.path / f"{name}.json").read_text())


class BundleStore:
    """The bundles of one store directory and its ``CURRENT`` pointer."""

    def __init__(self, layout: StoreLayout, keep: int = 5):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.layout = layout
        self.keep = keep

    # -- writing ----------------------------------------------------------------
    def draft(self) -> BundleDraft:
        """A new staging directory inside the store (same filesystem, so rename is atomic)."""
        mkdir_published(self.layout.bundles)  # a server running as another uid lists and reads it
        return BundleDraft(self.layout.bundles / f"{STAGING_PREFIX}{uuid.uuid4().hex}")

    def publish(
        self,
        draft: BundleDraft,
        method: str,
        params: dict[str, Any] | None = None,
        zoo: dict[str, Any] | None = None,
        tasks: list[str] | None = None,
        extra: ManifestExtra | None = None,
        make_current: bool = True,
    ) -> str:
        """Publish ``draft`` as the next version and (by default) make it current.

        On any error the draft is discarded and the store is left as it was.
        """
        try:
            with FileLock(str(self.layout.lock)):
                version = f"v{self._next_number()}"
                files = {p.name: FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size) for p in draft.files()}
                manifest = BundleManifest(
                    version=version,
                    method=method,
                    params=params or {},
                    zoo=zoo or {},
                    tasks=tasks or [],
                    created_at=utc_timestamp(),
                    files=files,
                    extra=extra or ManifestExtra(),
                )
                (draft.path / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
                make_world_readable(draft.path)  # servers running as another uid read it (safetensors writes 0600)
                for p in draft.path.iterdir():
                    fsync_path(p)
                fsync_path(draft.path)
                final = self.layout.bundles / version
                draft.path.rename(final)
                fsync_path(self.layout.bundles)
                if make_current:
                    self._write_current(version)
        except BaseException:
            draft.discard()
            raise
        if make_current:  # not CURRENT yet: prune nothing, its load may still fail (set_current prunes)
            self.prune()
        return version

    def set_current(self, version: str) -> None:
        """Point ``CURRENT`` at an existing, verified version (a merge job's last step, a rollback), then prune."""
        self.load(version)
        with FileLock(str(self.layout.lock)):
            self._write_current(version)
        self.prune()

    def remove(self, version: str) -> None:
        """Delete a published version that is not ``CURRENT`` (e.g. one that failed to load)."""
        version_number(version)
        with FileLock(str(self.layout.lock)):
            if version == self.current_version():
                raise BundleIntegrityError(f"refusing to remove {version}: it is CURRENT")
            shutil.rmtree(self.layout.bundles / version, ignore_errors=True)

    def _write_current(self, version: str) -> None:
        atomic_write_text(self.layout.current, version + "\n", mode=PUBLISHED_FILE_MODE)

    def _next_number(self) -> int:
        nums = [version_number(v) for v in self.versions()]
        return max(nums, default=0) + 1

    def prune(self) -> list[str]:
        """Delete versions older than the newest ``keep`` (never the current one) and stale drafts."""
        removed = []
        with FileLock(str(self.layout.lock)):
            current = self.current_version()
            for version in self.versions()[: -self.keep]:
                if version != current:
                    shutil.rmtree(self.layout.bundles / version, ignore_errors=True)
                    removed.append(version)
            now = time.time()
            for p in self.layout.bundles.glob(f"{STAGING_PREFIX}*"):
                if now - p.stat().st_mtime > STALE_STAGING_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
        return removed

    # -- reading ----------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        if not self.layout.bundles.is_dir():
            return []
        found = [p.name for p in self.layout.bundles.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(found, key=version_number)

    def current_version(self) -> str | None:
        path = self.layout.current
        if not path.exists():
            return None
        text = path.read_text().strip()
        return text or None

    def load(self, version: str | None = None, verify: bool = True) -> Bundle:
        """Load ``version`` (default: ``CURRENT``), verifying every file's sha256."""
        if version is None:
            version = self.current_version()
            if version is None:
                raise BundleIntegrityError(
                    f"store {self.layout.root} has no CURRENT bundle (run `vitmerge merge` first)"
                )
        try:
            version_number(version)
        except ValueError as e:
            raise BundleIntegrityError(str(e)) from e
        path = self.layout.bundles / version
        if not path.is_dir():
            raise BundleIntegrityError(
                f"bundle {version} does not exist in {self.layout.bundles} (versions: "
                f"{', '.join(self.versions()) or 'none'})"
            )
        return load_bundle_dir(path, verify=verify)


def load_bundle_dir(path: Path, verify: bool = True) -> Bundle:
    """Load one bundle directory; refuse it when the manifest or any file is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise BundleIntegrityError(f"bundle {path.name}: {MANIFEST} is missing (partial or not a bundle)")
    try:
        manifest = BundleManifest.model_validate_json(manifest_path.read_text())
    except ValidationError as e:
        raise BundleIntegrityError(
            f"bundle {path.name}: invalid {MANIFEST}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}"
        ) from e
    if manifest.version != path.name:
        raise BundleIntegrityError(f"bundle {path.name}: manifest says version {manifest.version}")
    for name, entry in manifest.files.items():
        file = path / name
        if not file.exists():
            raise BundleIntegrityError(f"bundle {path.name}: file {name} is missing")
        if verify:
            size = file.stat().st_size
            if size != entry.bytes:
                raise BundleIntegrityError(
                    f"bundle {path.name}: file {name} has {size} bytes, manifest says {entry.bytes}"
                )
            digest = sha256_file(file)
            if digest != entry.sha256:
                raise BundleIntegrityError(
                    f"bundle {path.name}: file {name} sha256 mismatch (manifest {entry.sha256[:12]}..., file "
                    f"{digest[:12]}...)"
                )
    return Bundle(path, manifest)
