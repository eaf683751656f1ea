"""WebDataset shards enumerated in Ray tasks, so that planning never reads a shard on the driver.

A tar has no index: its member names and offsets are in a header before each member, so enumerating a
shard of small face crops reads essentially all of it (on object storage, the whole object). Done on the
driver, planning WebFace260M would read the corpus on one thread before scoring a single image. Here each
shard is one Ray task (NeMo Curator's unit of work) that returns the shard's items as a small Arrow table;
the driver only submits tasks and collects tables, a bounded number in flight, in the order of the shards.

A small input is listed in this process instead (`TASKS_FROM_BYTES`): starting Ray costs seconds, while
reading a few MB costs milliseconds, and a rerun with every shard committed would start Ray for nothing.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from fiqa_curator.flows.sources import InputError, TarLister, TarShard, list_tar_members, list_tars_in_process

# Shards are listed in Ray tasks when Ray runs already, or when they hold at least this many bytes (a
# shard of unknown size counts as this big).
TASKS_FROM_BYTES = 64 * 1024**2
IN_FLIGHT_PER_CPU = 4  # listing tasks submitted per CPU of the cluster: enough to hide the store's latency
LISTING_TASK_CPUS = 0.25  # mostly waiting on storage, like reading images for scoring


def _list_in_task(shard: TarShard, storage_options: Mapping[str, Any] | None) -> tuple[pa.Table | None, str]:
    """(items, "") or (None, why): an unreadable shard is the user's problem, told as such on the driver."""
    try:
        return list_tar_members(shard, storage_options), ""
    except InputError as error:
        return None, str(error)


def list_tars_in_ray_tasks(
    tars: Sequence[TarShard], storage_options: Mapping[str, Any] | None = None
) -> Iterator[pa.Table]:
    """A TarLister: each shard enumerated in a Ray task (Ray must be running); tables in the shards' order."""
    import ray

    task = ray.remote(num_cpus=LISTING_TASK_CPUS)(_list_in_task)
    options = ray.put(dict(storage_options or {}))  # once, not once per task
    window = max(1, int(ray.cluster_resources().get("CPU", 1) * IN_FLIGHT_PER_CPU))
    in_flight: deque = deque()
    upcoming = iter(tars)
    while True:
        while len(in_flight) < window and (shard := next(upcoming, None)) is not None:
            in_flight.append(task.remote(shard, options))
        if not in_flight:
            return
        table, error = ray.get(in_flight.popleft())
        if table is None:
            for reference in in_flight:
                ray.cancel(reference)
            raise InputError(error)
        yield table


def tar_lister(ensure_ray: Callable[[], None]) -> TarLister:
    """The TarLister for a scoring run: in Ray tasks when Ray runs or the shards are big (`ensure_ray`
    starts or joins it then), else in this process."""

    def list_tars(tars: Sequence[TarShard], storage_options: Mapping[str, Any] | None) -> Iterator[pa.Table]:
        # not `import ray` to ask: Ray must not be imported before `cluster.init_ray` has set its environment
        ray = sys.modules.get("ray")
        running = ray is not None and ray.is_initialized()
        total = sum(shard.size if shard.size >= 0 else TASKS_FROM_BYTES for shard in tars)
        if not running and total < TASKS_FROM_BYTES:
            yield from list_tars_in_process(tars, storage_options)
            return
        ensure_ray()
        yield from list_tars_in_ray_tasks(tars, storage_options)

    return list_tars
