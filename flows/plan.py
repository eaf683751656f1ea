"""The scoring plan: a deterministic, sorted listing cut into shards, saved in OUTPUT (`_plan.json`,
`_plan/listing.parquet`; schemas.layout) with fingerprints of the listing and of the scoring
configuration, and the rules for resuming against it.

The listing (`sources.ITEM_SCHEMA`) is sorted by image_id; shard `i` is its rows `i * shard_size` up to
the next shard's. A run's listing is a local file sorted on disk (`listing_sort.SortedListing`): the plan
reads it once, a slice at a time, to fingerprint it, reject repeated ids and write it in row groups
aligned with the shards, the file OUTPUT keeps. A listing in memory (an Arrow table, tests and tools)
gives the same plan and fingerprint. Fingerprinting and cutting are Arrow and numpy operations.

Once saved, the listing is not needed on the driver: the scoring pipeline starts from one small
description per pending shard (`shard_tasks`; with `--since`, the ids still to score of shards carried
over in part), and each reading task gets its shard's items from the saved listing (`shard_items`,
`read_listing_rows`: one row group, the file's footer read once per worker process).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa_curator.flows.listing_sort import SortedListing
from fiqa_curator.flows.sources import ITEM_SCHEMA, InputItem, duplicate_ids, in_id_order, items_to_table
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import LISTING_FILE, PLAN_FILE, SCORES, shard_name
from fiqa_curator.workers.io import filesystem, with_retries

# 2: the listing fingerprint is taken over Arrow columns (1: a JSON line per item; still recognised, so
# that an output planned by version 1 resumes)
PLAN_VERSION = 2
FINGERPRINT_ROWS = 65_536  # rows hashed at a time: the digest does not depend on how the table is chunked
# Fewest rows per row group of the saved listing: groups hold whole shards, so that a shard's task reads
# one group, but not fewer rows than this (thousands of tiny groups would bloat the file's footer).
LISTING_GROUP_MIN_ROWS = 10_000


class PlanConflict(UserError):
    """OUTPUT holds results of another listing or configuration; mixing them needs --overwrite."""


def _column_bytes(column: pa.ChunkedArray) -> list[bytes | pa.Buffer]:
    """A column's canonical bytes: which rows are null, then the values (strings: each one's length in
    bytes, then their UTF-8; integers: little-endian int64), whatever the chunks and offsets. Strings'
    bytes are a zero-copy view of Arrow's buffer."""
    values = column.combine_chunks()
    valid = np.packbits(pc.is_valid(values).to_numpy(zero_copy_only=False)).tobytes()
    if not pa.types.is_string(values.type):
        return [valid, pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype("<i8").tobytes()]
    filled = pc.fill_null(values, "")
    lengths = pc.binary_length(filled).to_numpy(zero_copy_only=False).astype("<i8")
    _, offset_buffer, data = filled.buffers()
    if data is None or len(filled) == 0:
        return [valid, lengths.tobytes(), b""]
    offsets = np.frombuffer(offset_buffer, dtype=np.int32)[filled.offset : filled.offset + len(filled) + 1]
    return [valid, lengths.tobytes(), data.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))]


def listing_fingerprint(listing: pa.Table) -> str:
    """sha256 of a sorted listing (`sources.ITEM_SCHEMA`'s columns), FINGERPRINT_ROWS rows at a time."""
    digest = hashlib.sha256()
    for start in range(0, listing.num_rows, FINGERPRINT_ROWS):
        _fingerprint_part(digest, listing.slice(start, FINGERPRINT_ROWS))
    return digest.hexdigest()


def _fingerprint_part(digest: Any, part: pa.Table) -> None:
    """Add FINGERPRINT_ROWS rows (fewer for the last part) to a listing's digest."""
    for name in ITEM_SCHEMA.names:
        digest.update(name.encode() + b"\0")
        for chunk in _column_bytes(part.column(name)):
            digest.update(len(chunk).to_bytes(8, "little"))  # pa.Buffer: its size
            digest.update(chunk)


class _Rechunker:
    """Tables in, tables of exactly `rows` rows out (the last one shorter): a file's batches end where its
    row groups do, while the fingerprint's slices and the saved listing's groups must not."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._held: list[pa.Table] = []
        self._count = 0

    def add(self, table: pa.Table) -> list[pa.Table]:
        self._held.append(table)
        self._count += table.num_rows
        if self._count < self.rows:
            return []
        joined = pa.concat_tables(self._held)
        whole = joined.num_rows // self.rows * self.rows
        self._held, self._count = [joined.slice(whole)], joined.num_rows - whole
        return [joined.slice(start, self.rows) for start in range(0, whole, self.rows)]

    def finish(self) -> list[pa.Table]:
        rest = pa.concat_tables(self._held) if self._count else None
        self._held, self._count = [], 0
        return [rest] if rest is not None else []


def listing_fingerprint_v1(listing: pa.Table) -> str:
    """Plan version 1's fingerprint (a JSON line per item), to recognise an output planned by it."""
    digest = hashlib.sha256()
    keys = ("image_id", "source", "offset", "length", "size", "version", "identity")
    for batch in listing.to_batches(max_chunksize=FINGERPRINT_ROWS):
        for row in batch.to_pylist():
            digest.update(json.dumps([row[key] for key in keys]).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def config_fingerprint(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


_LOCAL_FIELDS = ("listing", "listing_file")  # this process's, not saved in _plan.json


@dataclass
class Plan:
    input_url: str
    input_kind: str
    item_count: int
    shard_size: int
    listing_fingerprint: str
    config_fingerprint: str
    scoring_config: dict[str, Any]
    version: int = PLAN_VERSION
    listing: pa.Table | None = field(default=None, repr=False)  # None when loaded from OUTPUT or on disk
    # a plan made from a SortedListing: its listing in a local file, shard-aligned (what save_plan commits)
    listing_file: str | None = field(default=None, repr=False)

    @property
    def shard_count(self) -> int:
        return (self.item_count + self.shard_size - 1) // self.shard_size

    def shard_length(self, index: int) -> int:
        """How many items shard `index` holds (the listing itself is not needed)."""
        return max(0, min(self.shard_size, self.item_count - index * self.shard_size))

    def shard_listing(self, index: int) -> pa.Table:
        """Shard `index`'s items (`sources.ITEM_SCHEMA`), in image_id order."""
        assert self.listing is not None, "a plan loaded from OUTPUT has no listing"
        return self.listing.slice(index * self.shard_size, self.shard_size)

    def load_listing(self) -> pa.Table:
        """The listing in memory (read from `listing_file` when the plan was made on disk)."""
        if self.listing is None:
            assert self.listing_file is not None, "a plan loaded from OUTPUT has no listing"
            self.listing = pq.read_table(self.listing_file).cast(ITEM_SCHEMA)
        return self.listing

    def to_json(self) -> str:
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _LOCAL_FIELDS}
        record["shards"] = [shard_name(i) for i in range(self.shard_count)]
        return json.dumps(record, indent=1, sort_keys=True)


def make_plan(
    input_url: str,
    input_kind: str,
    listing: pa.Table | Sequence[InputItem] | SortedListing,
    shard_size: int,
    scoring_config: Mapping[str, Any],
) -> Plan:
    """The plan of a listing: an Arrow table with `sources.ITEM_SCHEMA`'s columns, items, or a sorted
    listing on local disk (`listing_sort.SortedListing`: read once, in slices, never whole)."""
    if shard_size < 1:
        raise UserError(f"shard size must be >= 1, got {shard_size}")
    ordered, listing_file = None, None
    if isinstance(listing, SortedListing):
        count = listing.rows
        fingerprint, listing_file = _plan_listing_file(listing, shard_size)
    else:
        table = listing if isinstance(listing, pa.Table) else items_to_table(list(listing))
        # a listing from `discover` is in order already: the plan then shares its buffers, no second copy
        ordered = in_id_order(table.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA))
        count, fingerprint = ordered.num_rows, listing_fingerprint(ordered)
    return Plan(
        input_url=input_url,
        input_kind=input_kind,
        item_count=count,
        shard_size=shard_size,
        listing_fingerprint=fingerprint,
        config_fingerprint=config_fingerprint(scoring_config),
        scoring_config=dict(scoring_config),
        listing=ordered,
        listing_file=listing_file,
    )


def _file_slices(path: str) -> Iterator[pa.Table]:
    """A listing file (ITEM_SCHEMA's columns) in slices of FINGERPRINT_ROWS rows, whatever its row groups."""
    slices = _Rechunker(FINGERPRINT_ROWS)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=FINGERPRINT_ROWS, columns=ITEM_SCHEMA.names):
        yield from slices.add(pa.Table.from_batches([batch]).cast(ITEM_SCHEMA))
    yield from slices.finish()


def file_fingerprint(path: str) -> str:
    """`listing_fingerprint` of a sorted listing in a local Parquet file, read a slice at a time."""
    digest = hashlib.sha256()
    for part in _file_slices(path):
        _fingerprint_part(digest, part)
    return digest.hexdigest()


def _plan_listing_file(listing: SortedListing, shard_size: int) -> tuple[str, str]:
    """One pass over a sorted listing file: its fingerprint (the same as `listing_fingerprint` of the
    table), repeated ids (InputError), and the file again with row groups aligned with the shards (its
    path, beside the sorted one, which is removed)."""
    digest = hashlib.sha256()
    aligned = listing.path.removesuffix(".parquet") + ".plan.parquet"
    groups = _Rechunker(listing_group_rows(shard_size))
    repeated: list[str] = []
    repeated_count, last_id, counted_last = 0, None, None
    with pq.ParquetWriter(aligned, ITEM_SCHEMA, write_statistics=False) as writer:

        def take(part: pa.Table) -> None:
            nonlocal repeated_count, last_id, counted_last
            _fingerprint_part(digest, part)
            ids = part.column("image_id").combine_chunks()
            before = pa.concat_arrays([pa.array([last_id], pa.string()), ids.slice(0, len(ids) - 1)])
            same = pc.fill_null(pc.equal(ids, before), False)  # sorted: a repeat follows its first
            if pc.any(same).as_py():
                found = pc.unique(ids.filter(same))
                if found[0].as_py() == counted_last:  # repeated across the slices' edge, counted already
                    found = found.slice(1)
                repeated.extend(found.slice(0, 5).to_pylist())
                repeated_count += len(found)
                if len(found):
                    counted_last = found[-1].as_py()
            last_id = ids[-1].as_py()
            for group in groups.add(part):
                writer.write_table(group, row_group_size=group.num_rows)

        for part in _file_slices(listing.path):
            take(part)
        for group in groups.finish():
            writer.write_table(group, row_group_size=group.num_rows)
    if repeated_count:
        os.remove(aligned)
        raise duplicate_ids(repeated, repeated_count)
    os.remove(listing.path)
    return digest.hexdigest(), aligned


def listing_group_rows(shard_size: int) -> int:
    """Rows per row group of the saved listing: a whole number of shards, at least LISTING_GROUP_MIN_ROWS."""
    return shard_size * max(1, -(-LISTING_GROUP_MIN_ROWS // shard_size))


def save_plan(output: Output, plan: Plan) -> None:
    if plan.listing is None:  # made on disk: the shard-aligned file goes as it is
        assert plan.listing_file is not None, "a plan loaded from OUTPUT is saved already"
        output.commit_file(LISTING_FILE, plan.listing_file)
        output.commit_bytes(PLAN_FILE, plan.to_json().encode())
        return
    buffer = io.BytesIO()
    pq.write_table(
        plan.listing, buffer, row_group_size=listing_group_rows(plan.shard_size), write_statistics=False
    )
    output.commit_bytes(LISTING_FILE, buffer.getvalue())
    output.commit_bytes(PLAN_FILE, plan.to_json().encode())


def load_plan(output: Output) -> Plan | None:
    raw = output.read_bytes(PLAN_FILE)
    if raw is None:
        return None
    record = json.loads(raw)
    record.pop("shards", None)
    return Plan(**record)  # fingerprints and boundaries; the listing itself stays in LISTING_FILE


_FOOTERS: dict[tuple[str, str], pq.FileMetaData] = {}  # this process's: (listing URL, fingerprint) -> footer


def read_listing_rows(
    listing: str | pa.Buffer,
    start: int,
    stop: int,
    storage_options: Mapping[str, Any] | None = None,
    *,
    key: str = "",
) -> pa.Table:
    """Rows `start` to `stop` of a saved listing (its URL, or its bytes), reading only the row groups that
    hold them: one for a shard of a listing saved by `save_plan` (any layout is read correctly). With
    `key` (the listing's fingerprint), a URL's footer is read once per process: the scoring tasks of one
    worker share it (a footer grows with the row groups: megabytes at 100M images)."""

    def read() -> tuple[pa.Table, int]:
        if isinstance(listing, str):
            fs, path = filesystem(listing, storage_options)
            # the ranges asked for, no more: an object store's file would read ahead 50 MiB by default
            handle = fs.open(path, "rb", cache_type="none")
        else:
            handle = pa.BufferReader(listing)
        cache = (listing, key) if key and isinstance(listing, str) else None
        with handle:
            parquet = pq.ParquetFile(handle, metadata=_FOOTERS.get(cache) if cache else None, pre_buffer=True)
            if cache and cache not in _FOOTERS:
                if len(_FOOTERS) >= 4:  # a long-lived worker serves run after run
                    _FOOTERS.clear()
                _FOOTERS[cache] = parquet.metadata
            groups, first_row, row = [], 0, 0
            for index in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(index).num_rows
                if row < stop and row + rows > start:
                    if not groups:
                        first_row = row
                    groups.append(index)
                row += rows
            table = parquet.read_row_groups(groups, columns=ITEM_SCHEMA.names) if groups else None
        if table is None:
            return ITEM_SCHEMA.empty_table(), row
        return table.cast(ITEM_SCHEMA).slice(start - first_row, stop - start), row

    rows, total = with_retries(read)
    if rows.num_rows != stop - start:  # OUTPUT's listing is not the plan's: never score a partial shard
        name = listing if isinstance(listing, str) else "the plan's listing"
        raise RuntimeError(f"{name} holds {total} rows, the plan expects rows {start} to {stop}")
    return rows


def saved_listing_fits(output: Output, existing: Plan) -> bool:
    """Whether OUTPUT's saved listing can serve this plan's scoring tasks: saved by this plan version, in
    row groups aligned with the shards, with every item. An OUTPUT planned by older code (one row group
    of a million rows, or plan version 1) resumes after its listing is committed again."""
    if existing.version != PLAN_VERSION:
        return False
    try:
        with output.fs.open(output.path(LISTING_FILE), "rb", cache_type="none") as handle:
            metadata = pq.ParquetFile(handle).metadata
    except (OSError, ValueError, pa.ArrowException):
        return False
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    group = listing_group_rows(existing.shard_size)
    return sum(sizes) == existing.item_count and all(size == group for size in sizes[:-1])


def shard_tasks(plan: Plan, pending: Sequence[int]) -> list[dict[str, Any]]:
    """One small description per pending shard for `shard_items` (`shard_task`), from the plan's counts
    alone."""
    return [shard_task(plan, index) for index in pending]


def shard_task(plan: Plan, index: int, only: pa.Array | None = None) -> dict[str, Any]:
    """Shard `index`'s description for `shard_items`: its name, its rows in the listing and, for a shard
    carried over in part by --since, the ids still to score (`only`) as a JSON list ("" means all)."""
    start = index * plan.shard_size
    return {
        "shard": shard_name(index),
        "start": start,
        "stop": start + plan.shard_length(index),
        "only": "" if only is None else json.dumps(only.to_pylist()),
    }


def shard_items(
    task: Mapping[str, Any],
    listing: str | pa.Buffer,
    storage_options: Mapping[str, Any] | None = None,
    *,
    key: str = "",
) -> pa.Table:
    """One shard's items to score (`schemas.batch.ITEM_COLUMNS`: with the output shard, without size and
    version), from its description (`shard_tasks`) and the saved listing (`read_listing_rows`). Runs in
    the reading tasks: the driver never holds the items it scores."""
    items = read_listing_rows(listing, task["start"], task["stop"], storage_options, key=key)
    if task["only"]:
        wanted = pa.array(json.loads(task["only"]), pa.string())
        items = items.filter(pc.is_in(items.column("image_id"), value_set=wanted))
    items = items.append_column("shard", pa.repeat(pa.scalar(task["shard"]), items.num_rows))
    return items.drop_columns(["size", "version"])


def reconcile(existing: Plan | None, new: Plan, *, overwrite: bool, has_results: bool) -> str:
    """Decide how a run proceeds: 'fresh', 'resume', or raise PlanConflict."""
    if existing is None:
        if has_results and not overwrite:
            raise PlanConflict(
                "OUTPUT already holds score files but no plan; use --overwrite to replace them"
            )
        return "fresh"
    differences = []
    same_listing = existing.listing_fingerprint == (
        listing_fingerprint_v1(new.load_listing())
        if existing.version == 1 and (new.listing is not None or new.listing_file is not None)
        else new.listing_fingerprint
    )
    if not same_listing:
        differences.append(
            f"the input listing changed ({existing.item_count} -> {new.item_count} items, "
            f"or their ids, sizes or versions)"
        )
    if existing.config_fingerprint != new.config_fingerprint:
        changed = sorted(
            k
            for k in set(existing.scoring_config) | set(new.scoring_config)
            if existing.scoring_config.get(k) != new.scoring_config.get(k)
        )
        differences.append(f"the scoring configuration changed ({', '.join(changed)})")
    if existing.shard_size != new.shard_size:
        differences.append(f"the shard size changed ({existing.shard_size} -> {new.shard_size})")
    if not differences:
        return "resume"
    if overwrite:
        return "fresh"
    raise PlanConflict(
        "OUTPUT holds results of a different plan: "
        + "; ".join(differences)
        + ". Refusing to mix them: use another OUTPUT, or --overwrite to replace the old results."
    )


def committed_shards(output: Output) -> set[str]:
    return {posixpath.splitext(name)[0] for name in output.list(SCORES) if name.endswith(".parquet")}
