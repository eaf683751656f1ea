"""The scoring actor's allocator settings (workers.allocator): large buffers served from the heap."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, ReferenceFixture

# Page faults of five cycles of a 100 MB buffer (malloc, write every page, free), read through ctypes so
# that no library of ours allocates in between; numpy's large arrays would ask for huge pages.
FAULTS = r"""
import ctypes, resource, sys
from fiqa_curator.workers.allocator import keep_large_buffers
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "kept":
    assert keep_large_buffers()
def cycle():
    buffer = libc.malloc(100 << 20)
    ctypes.memset(buffer, 1, 100 << 20)
    libc.free(buffer)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_large_buffers_stop_faulting_in_again_once_kept() -> None:
    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=REPO_ROOT, check=True
        )
        return int(done.stdout)

    default, kept = faults("default"), faults("kept")
    assert default > 5 * 20_000  # mapped fresh each time: 25,600 pages of 4 KB per cycle
    assert kept < 1_000  # the heap's pages, faulted in once before counting


def test_the_scoring_actor_keeps_large_buffers_on_cpu(reference: ReferenceFixture, monkeypatch) -> None:
    from fiqa_curator.workers import stages

    calls = []
    monkeypatch.setattr(stages, "keep_large_buffers", lambda: calls.append(1) or True)
    config = json.loads((reference.path / "config.json").read_text())
    actor = stages.ScoreActor(str(reference.checkpoint), config, device="cpu", batch_size=2)
    assert actor.keeps_large_buffers and calls == [1]
