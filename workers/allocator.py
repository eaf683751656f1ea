"""The C allocator's settings for a process that runs the model on CPU (a scoring actor).

glibc maps every allocation above its dynamic threshold (at most 32 MB) fresh with mmap and unmaps it on
free, so each of a forward pass's large buffers (a ViT-S MLP activation at batch 64 is about 100 MB)
faults its pages in again, operation after operation. Served from the heap and kept there, they cost that
once (docs/benchmarks.md has the figures); the price is memory the process keeps after the pass.

Two settings are needed, and both must hold from the process's start, so they travel as `GLIBC_TUNABLES`
in the environment it is started with (Ray's `runtime_env`), not as `mallopt` calls made later:
- the thresholds (mmap above LARGE_BUFFER_BYTES only; trim the heap only when that much is free);
- one arena: Ray Data calls an actor's `__call__` on a thread of its own, and an arena other than the main
  one cannot hold a block above 64 MB whatever the threshold (measured: a thread kept faulting 100 MB
  buffers in under `mallopt`, not with `arena_max=1`); glibc fixes the number of arenas when it first
  needs a second one, which in a Ray worker is before any code of ours runs.
Other C libraries (musl) ignore the variable. The Python API changes nothing of the caller's process:
`fiqa` sets this for its actors; a script of one's own can be started with the same environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

LARGE_BUFFER_BYTES = 1 << 30  # buffers below this come from the heap, and the heap keeps this much free
LARGE_BUFFER_TUNABLES = (
    f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={LARGE_BUFFER_BYTES}:"
    f"glibc.malloc.trim_threshold={LARGE_BUFFER_BYTES}"
)


def large_buffer_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment variables for a new process that should keep its large buffers in the heap: ours
    first, then any `GLIBC_TUNABLES` the caller has (glibc takes the last value of a tunable given twice,
    so the caller's own choices win)."""
    existing = environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": f"{LARGE_BUFFER_TUNABLES}:{existing}" if existing else LARGE_BUFFER_TUNABLES}


def keeps_large_buffers(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with `large_buffer_environment` (the scoring actor, benchmarks)."""
    return LARGE_BUFFER_TUNABLES in environ.get("GLIBC_TUNABLES", "")
