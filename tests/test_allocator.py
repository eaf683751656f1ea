"""The scoring actor's allocator settings (workers.allocator): large buffers served from the heap, on the
thread that calls the model, in a process started with them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fiqa_curator.workers.allocator import (
    LARGE_BUFFER_TUNABLES,
    keeps_large_buffers,
    large_buffer_environment,
)
from tests.conftest import ReferenceFixture

# Bytes glibc holds in mmap'd blocks while a 100 MB buffer is held by a thread other than the main one (as
# Ray Data calls an actor): mallinfo2's hblkhd, whatever the page size.
MAPPED = r"""
import ctypes, threading
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.mallinfo2.restype = MallInfo2
mapped = []
def hold():
    buffer = libc.malloc(100 << 20)
    mapped.append(libc.mallinfo2().hblkhd)
    libc.free(buffer)
thread = threading.Thread(target=hold)
thread.start()
thread.join()
print(mapped[0])
"""


def glibc_with_mallinfo2() -> bool:
    import ctypes

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) on Linux")
def test_a_threads_large_buffer_comes_from_the_heap_in_a_process_started_so() -> None:
    def mapped(environment: dict[str, str]) -> int:
        done = subprocess.run(
            [sys.executable, "-c", MAPPED], capture_output=True, text=True, env=environment, check=True
        )
        return int(done.stdout)

    plain = {"PATH": "/usr/bin:/bin"}
    assert mapped(plain) >= 100 << 20  # mapped fresh (and faulted in again on every use)
    assert mapped({**plain, **large_buffer_environment({})}) < 100 << 20


def test_the_callers_own_tunables_are_kept_and_win() -> None:
    assert large_buffer_environment({}) == {"GLIBC_TUNABLES": LARGE_BUFFER_TUNABLES}
    mine = "glibc.malloc.arena_max=4"
    merged = large_buffer_environment({"GLIBC_TUNABLES": mine})["GLIBC_TUNABLES"]
    assert merged.endswith(":" + mine) and keeps_large_buffers({"GLIBC_TUNABLES": merged})
    assert not keeps_large_buffers({}) and not keeps_large_buffers({"GLIBC_TUNABLES": mine})


def test_the_scoring_actor_knows_how_it_was_started(reference: ReferenceFixture, monkeypatch) -> None:
    from fiqa_curator.workers.stages import ScoreActor

    config = json.loads((reference.path / "config.json").read_text())
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert not ScoreActor(str(reference.checkpoint), config, device="cpu", batch_size=2).keeps_large_buffers
    monkeypatch.setenv("GLIBC_TUNABLES", LARGE_BUFFER_TUNABLES)
    assert ScoreActor(str(reference.checkpoint), config, device="cpu", batch_size=2).keeps_large_buffers
