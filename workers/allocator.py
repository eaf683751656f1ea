"""The C allocator's settings for a process that runs the model on CPU (a scoring actor).

glibc maps every allocation above its dynamic threshold (at most 32 MB) fresh with mmap and unmaps it on
free, so each of a forward pass's large buffers (a ViT-S MLP activation at batch 64 is about 100 MB)
faults its pages in again, operation after operation. Served from the heap and kept there, they cost that
once. Measured on the bare model at exit 4 (docs/benchmarks.md): system time 3.2 s -> 0.2 s per 512
images, CPU per image -9%; the price is memory the process keeps after the pass (its peak RSS +0.1 to 0.4
GB at batch 64). Process-wide, so the Python API leaves it to the caller; the scoring actor calls it.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 1 << 30  # buffers below this come from the heap, and the heap keeps this much free


def keep_large_buffers() -> bool:
    """Serve allocations below LARGE_BUFFER_BYTES from the heap and keep up to as much freed memory in it.
    True when the C library took both settings (glibc on Linux), False elsewhere (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has a mallopt that does nothing: it returns 0)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, LARGE_BUFFER_BYTES)
    )
