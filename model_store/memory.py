"""Host-memory policy of every vitmerge process (glibc ``malloc`` on Linux; a no-op elsewhere).

One policy, two settings:

* **Default: return freed memory at once** (:func:`limit_heap_fragmentation`, called by the ``vitmerge``
  entry point, so by merges, evaluations and the server). Blocks >= 1 MiB come from ``mmap`` and go back
  to the OS on ``free``. glibc otherwise raises its mmap threshold after large frees, after which freed
  multi-MB tensors stay in the heap and resident memory only grows: a merge that allocates one large
  tensor per key then peaks far above what it holds. Training loops, which free and re-allocate MB-sized
  activations every step, lift the threshold to glibc's ceiling while they run
  (:func:`training_allocations`; with the 1 MiB threshold gate training ran 2.3x slower).
* **Opt-in for a serving process whose batches repeat: keep freed memory for the next batch**
  (:func:`reuse_freed_memory`, ``VITMERGE_MALLOC_REUSE=true``). No ``mmap`` for large blocks, one arena,
  trimming only above 2 GiB of free heap top, as a caching allocator does: a ViT-B/16 batch of 32 has
  58-77 MB activations that would otherwise be mapped, page-faulted and unmapped every forward; measured
  6-11% faster batches on this project's 2-core CPU (BENCHMARKS.md, "Low-rank task deltas"). The price:
  the heap never shrinks and can fragment -- a benchmark process churning weights (EMR engines at a small
  cache materialising a 327 MB task model per batch, beside six other engines) grew past 24 GB. It
  overrides the default (``mmap`` off altogether) for the rest of the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger("vitmerge.memory")

#: ``mallopt`` parameters (``<malloc.h>``)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
#: the default policy's mmap threshold: blocks from 1 MiB up are returned at once
DEFAULT_MMAP_THRESHOLD = 1 << 20
#: glibc's ceiling for its dynamic threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): training loops
TRAINING_MMAP_THRESHOLD = 32 << 20
#: reuse policy: free heap top kept before ``malloc`` returns it to the OS (a C ``int``)
TRIM_THRESHOLD = 2**31 - 1
_limited: int | None = None


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply ``(parameter, value)`` pairs with glibc's ``mallopt``; False off Linux, without glibc, or on refusal."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(p, int(v)) == 1 for p, v in settings)


def limit_heap_fragmentation(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """The default policy: serve allocations >= ``mmap_threshold`` bytes from mmap and return them on free
    (what ``MALLOC_MMAP_THRESHOLD_`` does); ``True`` when applied."""
    global _limited
    ok = _mallopt((M_MMAP_THRESHOLD, mmap_threshold))
    if ok:
        _limited = int(mmap_threshold)
    return ok


@contextlib.contextmanager
def training_allocations() -> Iterator[None]:
    """Inside this block the mmap threshold is glibc's usual ceiling (training re-allocates MB-sized
    activations every step); afterwards the default policy's is restored (only if it had been set)."""
    if _limited is None:
        yield
        return
    _mallopt((M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD))
    try:
        yield
    finally:
        _mallopt((M_MMAP_THRESHOLD, _limited))


def reuse_freed_memory() -> bool:
    """The opt-in serving policy (see the module doc); ``True`` when applied.

    Call it early, before the worker threads start: threads that already have an arena keep it.
    """
    applied = _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1))
    log.info("malloc tuned to reuse freed memory: %s", applied)
    return applied
