"""Process memory hygiene for long merges and servers (glibc only; a no-op elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3


def limit_heap_fragmentation(mmap_threshold: int = 1 << 20) -> bool:
    """Serve allocations >= ``mmap_threshold`` bytes from mmap and return them on free.

    glibc raises its mmap threshold dynamically after large frees, after which freed
    multi-MB tensors stay in the heap and resident memory only grows; a merge that
    allocates one large tensor per key then peaks far above what it holds. Fixing
    the threshold (what ``MALLOC_MMAP_THRESHOLD_`` does) returns such memory at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    except (OSError, AttributeError):
        return False
