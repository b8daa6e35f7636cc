"""Process memory hygiene for long merges and servers (glibc only; a no-op elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for its dynamic threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRAINING_MMAP_THRESHOLD = 32 << 20
_limited: int | None = None


def limit_heap_fragmentation(mmap_threshold: int = 1 << 20) -> bool:
    """Serve allocations >= ``mmap_threshold`` bytes from mmap and return them on free.

    glibc raises its mmap threshold dynamically after large frees, after which freed
    multi-MB tensors stay in the heap and resident memory only grows; a merge that
    allocates one large tensor per key then peaks far above what it holds. Fixing
    the threshold (what ``MALLOC_MMAP_THRESHOLD_`` does) returns such memory at once.
    """
    global _limited
    ok = _mallopt_threshold(mmap_threshold)
    if ok:
        _limited = int(mmap_threshold)
    return ok


def _mallopt_threshold(value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, int(value)))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def training_allocations() -> Iterator[None]:
    """Training loops free and re-allocate MB-sized activations every step: with the 1 MiB
    threshold each of them is a fresh mmap (page faults + zeroing; gate training ran 2.3x
    slower). Inside this block the threshold is glibc's usual ceiling; afterwards it is
    restored (only if :func:`limit_heap_fragmentation` had set it)."""
    if _limited is None:
        yield
        return
    _mallopt_threshold(TRAINING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _mallopt_threshold(_limited)
