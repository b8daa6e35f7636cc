"""Host-memory allocator tuning for a serving process (glibc ``malloc`` on Linux).

By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``. A ViT-B/16 batch of 32 images has 58-77 MB activations (qkv,
MLP hidden), so every forward maps, page-faults (4 KiB pages, zero-filled) and unmaps gigabytes.
:func:`reuse_freed_memory` makes ``malloc`` serve those blocks from its heap and keep freed memory
for the next batch, as a caching allocator does: no mmap for large blocks, one arena (a worker
thread's arena would otherwise map 64 MiB sub-heaps and hit the same faults), trimming only above
2 GiB of free heap top. Measured on this project's 2-core CPU (BENCHMARKS.md, "Low-rank task
deltas"): a plain ViT-B/16 batch of 32 ran 6-11% faster, in the main and in a worker thread alike.
The price: the process keeps its peak heap (RSS does not fall after a big batch), and without
mmap a heap can fragment and grow -- a benchmark process churning weights (EMR engines at a small
cache materialising a 327 MB task model per batch, beside six other engines) grew past 24 GB and was
killed. Hence opt-in (``VITMERGE_MALLOC_REUSE=true``), for a process whose batches repeat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("vitmerge.host_memory")

#: ``mallopt`` parameters (``<malloc.h>``)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
#: free heap top kept before ``malloc`` returns it to the OS (a C ``int``)
TRIM_THRESHOLD = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Tune glibc's ``malloc`` for repeated big batches (see the module doc); ``True`` when applied.

    A no-op returning ``False`` off Linux or without glibc (e.g. musl). Call it early, before the
    worker threads start: threads that already have an arena keep it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(
        mallopt(p, v) == 1 for p, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1))
    )
    log.info("malloc tuned to reuse freed memory: %s", applied)
    return applied
