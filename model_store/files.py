"""Small file helpers shared by zoos and bundles: hashing, durable writes, timestamps, installed packages."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any


def utc_timestamp() -> str:
    """Now, UTC, ISO 8601 to the second (``created_at`` of zoos, bundles and merge jobs)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def package_dir(pkg: str) -> Path | None:
    """Directory of an installed package (its data files live there), without importing it; None if absent."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directory entries survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Modes of everything published into a store (bundles, zoo models): readable by any user, so a
#: server running as another uid (the container's 10001) can load a store written by root or a CI
#: user. safetensors creates its files 0600 whatever the umask; these are set before the atomic rename.
PUBLISHED_FILE_MODE = 0o644
PUBLISHED_DIR_MODE = 0o755


def make_world_readable(root: Path) -> None:
    """chmod ``root`` (a directory about to be published) and everything below it to the published modes."""
    root.chmod(PUBLISHED_DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), PUBLISHED_DIR_MODE)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), PUBLISHED_FILE_MODE)


def mkdir_published(path: Path) -> None:
    """``mkdir -p path``; the directories it creates get :data:`PUBLISHED_DIR_MODE` whatever the umask."""
    missing = []
    parent = path
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in missing:
        created.chmod(PUBLISHED_DIR_MODE)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never half (``mode``: its chmod)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
