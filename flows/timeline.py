"""Where a scoring run's seconds go, counted from the moment its process started.

A short job is mostly start-up (imports, Prefect's server, the checkpoint's hash, Ray, the actors), and the
per-stage seconds of `_run.json` began only at the flow: the seconds before it were invisible. Each step
marks the moment it finished, as seconds since the process started (the operating system's clock of the
process, so imports before any of our code count too); `_run.json` keeps them as `timeline`.

One run at a time per process (`fiqa score`, the demo, the nightly flow's sequential runs): `begin_run()`
starts a run's timeline, `mark()` adds to it, `events()` reads it.
"""

from __future__ import annotations

import os
import time


def _process_started() -> float:
    """When this process started, in time.time()'s seconds: its age from the kernel's own clock (the
    process's start in ticks since boot against the uptime, both precise to the tick; the boot time in
    /proc/stat is rounded to whole seconds). Elsewhere than Linux: when this module was imported."""
    now = time.time()
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, `starttime`
            age = float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
        return now - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return now


_PROCESS_STARTED = _process_started()
_events: dict[str, float] = {}


def since_process_start() -> float:
    return round(time.time() - _PROCESS_STARTED, 3)


def begin_run() -> None:
    """Start a run's timeline: the process's start, then the run's."""
    _events.clear()
    _events["process started"] = 0.0
    _events["run started"] = since_process_start()


def mark(event: str) -> None:
    """`event` happened now."""
    _events[event] = since_process_start()


def events() -> dict[str, float]:
    """The run's events so far, in the order they were marked."""
    return dict(_events)
