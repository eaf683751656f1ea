"""Where WebDataset shards are enumerated: a big input's in Ray tasks, so that the driver reads none of them;
a small input's in the driver's process; an unchanged shard's not at all.

A tar has no index: its member names and offsets are in a header before each member, so enumerating a
shard of small face crops reads essentially all of it (on object storage, the whole object). Done on the
driver, planning WebFace260M would read the corpus on one thread before scoring a single image. Here each
shard is one Ray task (NeMo Curator's unit of work) that returns the shard's items as a small Arrow table;
the driver only submits tasks and collects tables, a bounded number in flight, as they finish.

When the shards left to read are small (`TASKS_FROM_BYTES`), they are read in this process instead:
starting Ray or its workers costs seconds, while reading a few MB costs milliseconds.

A shard is not read at all when OUTPUT's saved plan already holds its members: a resume (after `kill -9`)
or a rerun of a corpus that did not change would otherwise read the whole corpus again just to plan.
`_plan/tars.parquet` records each shard's URL, id prefix, size and version (ETag or mtime) with the
fingerprint of the listing they went into; a shard whose four are unchanged takes its members from the
saved listing, after that listing is checked against its fingerprint. A store that reports no version
never lets a shard be reused.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa_curator.flows.plan import PLAN_VERSION, Plan, file_fingerprint, load_plan
from fiqa_curator.flows.sources import (
    ITEM_SCHEMA,
    InputError,
    TarShard,
    list_tar_members,
    list_tars_in_process,
)
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.layout import LISTING_FILE, TARS_FILE
from fiqa_curator.workers.io import with_retries

TARS_SCHEMA = pa.schema(
    [("url", pa.string()), ("tar_id", pa.string()), ("size", pa.int64()), ("version", pa.string())]
)
logger = logging.getLogger(__name__)
FINGERPRINT_KEY = b"fiqa.listing_fingerprint"  # TARS_FILE's metadata: the listing its shards went into

# Shards are listed in Ray tasks when they hold at least this many bytes together (a shard of unknown
# size counts as this big); fewer are read here faster than Ray's workers start.
TASKS_FROM_BYTES = 64 * 1024**2
MEMBER_BATCH_ROWS = 65_536  # rows of the saved listing read at a time when shards are reused
IN_FLIGHT_PER_CPU = 4  # listing tasks submitted per CPU of the cluster: enough to hide the store's latency
# A listing task waits on storage, then parses headers (Python's tarfile: CPU-bound); four per core keep
# the cores busy while some wait (1,000 shards on 2 cores: 1.6x faster than the driver alone; bench_scale.py)
LISTING_TASK_CPUS = 0.25


def _list_in_task(shard: TarShard, storage_options: Mapping[str, Any] | None) -> tuple[pa.Table | None, str]:
    """(items, "") or (None, why): an unreadable shard is the user's problem, told as such on the driver."""
    try:
        return list_tar_members(shard, storage_options), ""
    except InputError as error:
        return None, str(error)


def list_tars_in_ray_tasks(
    tars: Sequence[TarShard], storage_options: Mapping[str, Any] | None = None
) -> Iterator[pa.Table]:
    """A TarLister: each shard enumerated in a Ray task, tables yielded as the tasks finish. Ray must be
    running (a bare `ray.put` would start one that nobody shuts down). Tasks still running when the
    caller stops (an unreadable shard, an interrupt) are cancelled."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("list_tars_in_ray_tasks needs Ray running (flows.cluster.start_ray)")
    task = ray.remote(num_cpus=LISTING_TASK_CPUS)(_list_in_task)
    options = ray.put(dict(storage_options or {}))  # once, not once per task
    window = max(1, int(ray.cluster_resources().get("CPU", 1) * IN_FLIGHT_PER_CPU))
    in_flight: list = []
    upcoming = iter(tars)
    try:
        while True:
            while len(in_flight) < window and (shard := next(upcoming, None)) is not None:
                in_flight.append(task.remote(shard, options))
            if not in_flight:
                return
            [finished], in_flight = ray.wait(in_flight, num_returns=1)
            table, error = ray.get(finished)
            if table is None:
                raise InputError(error)
            yield table
    finally:
        for reference in in_flight:
            ray.cancel(reference)


def _shard_keys(table: pa.Table) -> list[tuple]:
    """A shard's identity for reuse: TARS_SCHEMA's columns, in order (as `_shard_key`)."""
    return list(zip(*(table.column(name).to_pylist() for name in TARS_SCHEMA.names), strict=True))


def _shard_key(shard: TarShard) -> tuple:
    return tuple(getattr(shard, name) for name in TARS_SCHEMA.names)


class SavedListing:
    """The members of shards that OUTPUT's saved plan already listed, for the shards unchanged since."""

    def __init__(self, output: Output, existing: Plan | None, index: pa.Table | None) -> None:
        self.output = output
        self.known: set[tuple] = set()
        self.fingerprint = ""
        if existing is None or existing.version != PLAN_VERSION or index is None:
            return
        if (index.schema.metadata or {}).get(FINGERPRINT_KEY) != existing.listing_fingerprint.encode():
            return  # written for another plan (a run killed between the plan and this index)
        self.known = {key for key in _shard_keys(index) if key[3]}  # a shard without a version: never
        self.fingerprint = existing.listing_fingerprint

    @classmethod
    def of(cls, output: Output) -> SavedListing | None:
        """OUTPUT's saved shards, or None when there are none or they cannot be read (a shortcut only: an
        OUTPUT that cannot be read or written is reported by the plan's own checks)."""
        try:
            existing = load_plan(output)
            raw = output.read_bytes(TARS_FILE) if existing is not None else None
            saved = cls(output, existing, pq.read_table(io.BytesIO(raw)) if raw is not None else None)
        except (OSError, ValueError, TypeError, pa.ArrowException):
            return None
        return saved if saved.known else None

    def members(self, shards: Sequence[TarShard]) -> Iterator[pa.Table] | None:
        """The saved members of `shards` (all of them known), a batch at a time, or None when the saved
        listing is not the one its plan fingerprinted (then every shard is read again). The listing is
        copied to local disk and checked a slice at a time: a rerun of 100M images holds none of it."""
        folder = tempfile.mkdtemp(prefix="fiqa-saved-listing-")
        local = os.path.join(folder, "listing.parquet")
        same, reason = False, "it is not the listing its plan fingerprinted"
        try:
            with_retries(lambda: self.output.fs.get_file(self.output.path(LISTING_FILE), local))
            same = file_fingerprint(local) == self.fingerprint
        except (OSError, ValueError, pa.ArrowException) as error:
            reason = f"{type(error).__name__}: {error}"
        finally:
            if not same:
                shutil.rmtree(folder, ignore_errors=True)
        if not same:
            logger.warning("OUTPUT's saved listing cannot be reused (%s): its tars are read again", reason)
            return None
        return _members_of(folder, local, [shard.url for shard in shards])


def _members_of(folder: str, local: str, urls: list[str]) -> Iterator[pa.Table]:
    """The tar members (offset >= 0) of `urls` in the listing file `local`; `folder` removed at the end."""
    try:
        wanted = pa.array(urls, pa.string())
        for batch in pq.ParquetFile(local).iter_batches(
            batch_size=MEMBER_BATCH_ROWS, columns=ITEM_SCHEMA.names
        ):
            part = pa.Table.from_batches([batch]).cast(ITEM_SCHEMA)
            keep = pc.and_(
                pc.is_in(part.column("url"), value_set=wanted), pc.greater_equal(part.column("offset"), 0)
            )
            yield part.filter(keep)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ShardLister:
    """The TarLister of a scoring run: shards OUTPUT's saved plan holds unchanged are not read; the others
    are listed in Ray tasks when they are big (`ensure_ray` starts or joins it then), else here.
    Remembers the shards it was given, for `save_index`."""

    def __init__(self, ensure_ray: Callable[[], None], saved: SavedListing | None = None) -> None:
        self.ensure_ray = ensure_ray
        self.saved = saved
        self.shards: list[TarShard] = []
        self.reused = 0  # shards whose members came from the saved listing

    def __call__(
        self, tars: Sequence[TarShard], storage_options: Mapping[str, Any] | None
    ) -> Iterator[pa.Table]:
        self.shards.extend(tars)
        known = [shard for shard in tars if self.saved and _shard_key(shard) in self.saved.known]
        members = self.saved.members(known) if known else None
        if members is not None:
            self.reused = len(known)
            yield from members
            known_urls = {shard.url for shard in known}
            tars = [shard for shard in tars if shard.url not in known_urls]
        if not tars:
            return
        total = sum(shard.size if shard.size >= 0 else TASKS_FROM_BYTES for shard in tars)
        if total < TASKS_FROM_BYTES:
            yield from list_tars_in_process(tars, storage_options)
            return
        self.ensure_ray()
        yield from list_tars_in_ray_tasks(tars, storage_options)

    def save_index(self, output: Output, fingerprint: str) -> None:
        """Record the shards and the fingerprint of the listing they went into (after the plan is saved:
        an index never describes a listing other than the one beside it). Nothing to write when every shard
        came from the saved index for this very listing: it holds them already."""
        unchanged = self.saved is not None and self.saved.fingerprint == fingerprint
        if not self.shards or (unchanged and self.reused == len(self.shards)):
            return
        shards = sorted(self.shards, key=lambda shard: shard.tar_id)  # the same file whatever the order
        index = pa.table(
            {name: [getattr(shard, name) for shard in shards] for name in TARS_SCHEMA.names}, TARS_SCHEMA
        ).replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()})
        buffer = io.BytesIO()
        pq.write_table(index, buffer)
        output.commit_bytes(TARS_FILE, buffer.getvalue())
