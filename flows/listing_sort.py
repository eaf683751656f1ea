"""A run's listing on local disk instead of in the driver's memory: spilled as it is listed, sorted by
image_id out of core.

A corpus of 100M images lists into tens of gigabytes of Arrow columns; the driver holds none of it.
`sort_listing` writes the unsorted parts (`sources.listing_parts`: a folder's objects or a manifest's rows
a batch at a time, tar shards' members as their tasks finish) to a local Parquet file, then DuckDB sorts it
into another with a bounded memory budget (spilling to its own temporary folder). `plan.make_plan` then
reads the sorted file once, in slices, to fingerprint it, find repeated ids and write it again in row
groups aligned with the shards; that file is what OUTPUT keeps (`_plan/listing.parquet`) and what the
scoring tasks read.

DuckDB orders VARCHAR by its UTF-8 bytes, as Arrow's sort does: a listing sorted either way is the same
table, with the same fingerprint (tested), so an OUTPUT planned in memory resumes from one planned here.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from fiqa_curator.flows.sources import ITEM_SCHEMA

# DuckDB's memory for the sort; it spills the rest to local disk (its own temporary folder). At 10M rows
# the listing is about 1.5 GB of columns: this bounds what the driver adds for it.
SORT_MEMORY = "256MiB"
SORT_THREADS = max(1, min(4, os.cpu_count() or 1))
PLANNING_FOLDER_PREFIX = "fiqa-plan-"  # then this host's name and the planning process's id


@contextmanager
def planning_folder(root: str | None = None) -> Iterator[str]:
    """A private folder for one run's local files under `root` (default: the system's temporary folder,
    TMPDIR), removed afterwards: the listing while it is planned, --since's carried rows while scoring. A
    run killed with `kill -9` cannot remove its own (a 100M-image listing leaves about 10 GB), so the
    folders of this host's processes that no longer exist are removed first (`remove_abandoned_folders`)."""
    root = root or tempfile.gettempdir()
    remove_abandoned_folders(root)
    prefix = f"{PLANNING_FOLDER_PREFIX}{socket.gethostname()}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=root) as folder:
        yield folder


def remove_abandoned_folders(root: str) -> list[str]:
    """Remove the planning folders under `root` whose process is gone: named for this host (another host
    or container sharing the folder may have a live process of the same id) and a process id that no
    process here has. Returns the folders removed."""
    mine = f"{PLANNING_FOLDER_PREFIX}{socket.gethostname()}-"
    removed = []
    for entry in os.scandir(root):
        pid = entry.name[len(mine) :].split("-", 1)[0]
        ours = entry.name.startswith(mine) and pid.isdigit() and entry.is_dir(follow_symlinks=False)
        if ours and not _process_exists(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class SortedListing:
    """A listing (ITEM_SCHEMA) in a local Parquet file, sorted by image_id; `rows` items."""

    path: str
    rows: int


def sort_listing(parts: Iterable[pa.Table], folder: str, *, memory_limit: str = SORT_MEMORY) -> SortedListing:
    """Write `parts` (tables with ITEM_SCHEMA's columns, any order) under `folder` and sort them by
    image_id into `folder`/sorted.parquet; the unsorted file is removed."""
    unsorted, ordered = os.path.join(folder, "unsorted.parquet"), os.path.join(folder, "sorted.parquet")
    rows = 0
    try:
        with pq.ParquetWriter(unsorted, ITEM_SCHEMA) as writer:
            for part in parts:
                if part.num_rows:
                    writer.write_table(part.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA))
                    rows += part.num_rows
    finally:
        close = getattr(parts, "close", None)
        if close is not None:  # a generator stopped early (an error): its listing tasks are cancelled now
            close()
    if rows == 0:
        os.replace(unsorted, ordered)  # an empty file with the schema
        return SortedListing(ordered, 0)
    from fiqa_curator.flows.table_sql import (
        connect,
        quote,
    )  # DuckDB: not for the scoring tasks that import plan

    with connect(memory_limit=memory_limit) as connection:  # its insertion order kept: the sorted order
        # a few threads: DuckDB wants some memory per thread, and a driver may have dozens of cores
        connection.execute(f"SET threads = {SORT_THREADS}")
        connection.execute(
            f"COPY (SELECT * FROM read_parquet({quote(unsorted)}) ORDER BY image_id) "
            f"TO {quote(ordered)} (FORMAT parquet)"
        )
    os.remove(unsorted)
    return SortedListing(ordered, rows)
