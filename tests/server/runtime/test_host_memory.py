"""glibc malloc tuning of the serving process: big tensors come from the reused heap, not fresh mmaps."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys, threading
import torch
from server.runtime.host_memory import reuse_freed_memory

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
