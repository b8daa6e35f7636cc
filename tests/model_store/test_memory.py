"""The host-memory policy (model_store.memory): big blocks returned at once by default; the opt-in serving
tuning serves activation-sized tensors from the reused heap, not fresh mmaps."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, threading
import torch
from model_store.memory import reuse_freed_memory

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = reuse_freed_memory() if sys.argv[1] == "tuned" else False
seen = []

def batch():  # an activation-sized tensor in a worker thread, as the server's engine thread makes them
    before = libc.mallinfo2().hblks  # blocks malloc serves with their own mmap
    x = torch.ones(20_000_000)  # 80 MB, above glibc's largest mmap threshold (32 MiB)
    seen.append(libc.mallinfo2().hblks - before)
    del x

t = threading.Thread(target=batch)
t.start(); t.join()
print(applied, seen[0])
"""


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    applied, mmapped = out.stdout.split()
    return applied, int(mmapped)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tuned_malloc_serves_activation_sized_tensors_from_the_heap_in_a_worker_thread():
    assert _probe("default") == ("False", 1)  # glibc's default: an 80 MB tensor is its own mapping
    assert _probe("tuned") == ("True", 0)  # tuned: from the (single, reused) heap


LIMIT_PROBE = """
import ctypes, sys
from model_store.memory import limit_heap_fragmentation

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
applied = limit_heap_fragmentation() if sys.argv[1] == "limited" else False
libc.free(libc.malloc(4 << 20))  # glibc's default: this free raises its mmap threshold to 4 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)
print(applied, libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_the_default_policy_keeps_returning_big_blocks_after_a_big_free():
    """glibc alone serves a 4 MiB block from the heap once a 4 MiB block was freed (memory kept); the default
    policy keeps it a mapping of its own, returned on free."""
    out = subprocess.run([sys.executable, "-c", LIMIT_PROBE, "default"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "0"]
    out = subprocess.run([sys.executable, "-c", LIMIT_PROBE, "limited"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "1"]
