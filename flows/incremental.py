"""Incremental runs (`fiqa score --since PREVIOUS`): carry the rows of unchanged images over from a previous
OUTPUT, so that a nightly run over a growing corpus scores only what is new or changed.

An image is unchanged when the previous run's listing has the same image_id with the same URL, byte
range, size and version (ETag or mtime) and that version is known: a store that reports no version never
lets an image be carried over (it is rescored). Its rows are copied from PREVIOUS's quality table as they
were, with the `run_id` of the run that scored them, so the new OUTPUT is the whole current table,
queryable as one, and a row's run_id tells whether it was scored now or carried over. Images that
disappeared from INPUT are not carried. PREVIOUS must have been scored with the same configuration
(model, exit depth, fusion, alignment, ...): mixing configurations in one table is refused. Images whose
previous row is a `read_error` are scored again (the store may have been down), as are images PREVIOUS
has no row for (it was interrupted).

How (`carry_by_shard`): shard by shard, in a merge of the two listings, which are both sorted by image_id.
The current plan's pending shards are read from its saved listing one row group at a time; PREVIOUS's
listing is read alongside, one row group at a time, as far as the shard's last image_id; the shard's items
are matched with PREVIOUS's rows in that range (a hash lookup on image_id, then column-wise comparisons),
and the unchanged ones' rows are taken from the files of PREVIOUS's shards that hold them (PREVIOUS's
plan says which: its shards are runs of its sorted listing), each file read once. What is held at a time is
a shard, a row group of each listing and a file or two of PREVIOUS: the memory does not grow with the
corpus, and nothing is made per row in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa_curator.flows.plan import Plan, load_plan
from fiqa_curator.flows.sources import ITEM_SCHEMA
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.batch import FACE_ID_PATTERN
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import LISTING_FILE, shard_file, shard_name
from fiqa_curator.schemas.status import Status
from fiqa_curator.workers.io import filesystem, with_retries

_ITEM_KEY = ("url", "offset", "length", "size", "version")
_ROW = "_row"  # a PREVIOUS listing row's number, which tells its shard in PREVIOUS


class IncrementalError(UserError):
    """PREVIOUS cannot be used for --since."""


def check_previous(previous: Output, plan: Plan) -> Plan:
    """PREVIOUS's plan, when its scores may be carried into `plan`'s table; IncrementalError otherwise."""
    earlier = load_plan(previous)
    if earlier is None:
        raise IncrementalError(f"--since {previous.full_url()}: not a fiqa OUTPUT (no _plan.json)")
    if earlier.config_fingerprint != plan.config_fingerprint:
        changed = sorted(
            k
            for k in set(earlier.scoring_config) | set(plan.scoring_config)
            if earlier.scoring_config.get(k) != plan.scoring_config.get(k)
        )
        raise IncrementalError(
            f"--since {previous.full_url()} was scored with another configuration "
            f"({', '.join(changed)}): its scores cannot be carried over into this table"
        )
    return earlier


@dataclass
class ShardCarry:
    """What --since carries into one pending shard of this run."""

    index: int  # the shard's index in this run's plan
    items: int  # the shard's items
    carried: int  # how many of them are carried over
    # PREVIOUS's rows of the carried items (a row per face with --align all), as its quality table has them,
    # plus `item_id`, `item_rows` (the item's rows) and `shard` (this run's)
    rows: pa.Table
    to_score: pa.Array  # the shard's image ids still to score, in image_id order


@dataclass
class _Group:
    """A row group of a listing: its row count (known without reading it) and how to read it."""

    rows: int
    read: Callable[[], pa.Table]


def listing_groups(
    listing: pa.Table | str, storage_options: Mapping[str, Any] | None = None, *, group_rows: int = 10_000
) -> Iterator[_Group]:
    """A saved listing's row groups (its URL; each read with retries, a transient error of an object
    store costs a retry, not the run), or an Arrow table's slices of `group_rows`; rows as
    `sources.ITEM_SCHEMA`."""
    if isinstance(listing, pa.Table):
        for start in range(0, listing.num_rows, group_rows):
            part = listing.slice(start, group_rows)
            yield _Group(part.num_rows, lambda part=part: part)
        return
    fs, path = filesystem(listing, storage_options)
    with with_retries(lambda: fs.open(path, "rb")) as handle:
        parquet = pq.ParquetFile(handle)
        for index in range(parquet.metadata.num_row_groups):

            def read(index: int = index) -> pa.Table:
                return with_retries(
                    lambda: parquet.read_row_group(index, columns=ITEM_SCHEMA.names).cast(ITEM_SCHEMA)
                )

            yield _Group(parquet.metadata.row_group(index).num_rows, read)


class _ListingCursor:
    """A sorted listing read forward, a row group at a time: `rows(start, stop)` (by row number) and
    `between(low, high)` (by image_id) hand rows at or after the last ones asked for; rows passed over are
    dropped (groups wholly before `start` are not even read), so what stays in memory is a row group or
    two, whatever the gaps between the shards asked for."""

    def __init__(self, groups: Iterator[_Group], *, numbered: bool = False) -> None:
        self._groups = groups
        self._numbered = numbered
        self._buffer = ITEM_SCHEMA.empty_table()
        self._first = 0  # the buffer's first row number
        self._read = 0  # rows passed so far, read or skipped
        if numbered:
            self._buffer = self._buffer.append_column(_ROW, pa.array([], pa.int64()))
        self._empty = self._buffer

    def _more(self, skip_before: int = -1) -> bool:
        """Read the next row group into the buffer (skipping, unread, those that end at or before row
        `skip_before`); False at the end."""
        for group in self._groups:
            if self._read + group.rows <= skip_before:
                self._read += group.rows
                self._buffer, self._first = self._empty, self._read
                continue
            table = group.read()
            if self._numbered:
                table = table.append_column(_ROW, pa.arange(self._read, self._read + table.num_rows))
            if not self._buffer.num_rows:
                self._buffer, self._first = table, self._read
            else:
                self._buffer = pa.concat_tables([self._buffer, table])
            self._read += table.num_rows
            return True
        return False

    def _drop(self, count: int) -> None:
        self._buffer = self._buffer.slice(count)
        self._first += count

    def rows(self, start: int, stop: int) -> pa.Table:
        """Rows `start` to `stop` (not before the rows asked for last)."""
        if self._read <= start:  # nothing buffered is wanted
            self._buffer, self._first = self._empty, self._read
        while self._read < stop and self._more(skip_before=start):
            pass
        if self._read < stop:
            raise RuntimeError(f"the plan's listing holds {self._read} rows, the plan expects {stop}")
        self._drop(max(0, start - self._first))
        return self._buffer.slice(0, stop - start).combine_chunks()

    def between(self, low: str, high: str) -> pa.Table:
        """The rows whose image_id lies between `low` and `high` (both included)."""
        parts = []
        while True:
            ids = self._buffer.column("image_id")
            self._drop(pc.sum(pc.less(ids, low)).as_py() or 0)  # sorted: the rows before `low` come first
            ids = self._buffer.column("image_id")
            within = pc.sum(pc.less_equal(ids, high)).as_py() or 0
            parts.append(self._buffer.slice(0, within))
            self._drop(within)
            if self._buffer.num_rows or not self._more():  # rows past `high` are left, or none are
                break
        return pa.concat_tables(parts).combine_chunks()


class _PreviousFiles:
    """PREVIOUS's quality-table files by shard index, with each row's item id; read once each, in order (a
    file is dropped once no later shard of this run can need it)."""

    def __init__(self, previous: Output, align: str | None) -> None:
        self._previous = previous
        self._align = align
        self._files: dict[int, tuple[pa.Table, pa.Array] | None] = {}  # None: no rows

    def rows_of(self, indices: Sequence[int]) -> tuple[pa.Table, pa.ChunkedArray] | None:
        """The rows of PREVIOUS's shards `indices` (ascending) and each row's item id; None when none has a
        file (an interrupted PREVIOUS)."""
        for index in [i for i in self._files if i < indices[0]]:
            del self._files[index]
        tables, owners = [], []
        for index in indices:
            if index not in self._files:
                raw = self._previous.read_bytes(shard_file(shard_name(index)))
                table = pq.read_table(pa.BufferReader(raw)) if raw else None
                if table is None or not table.num_rows:
                    self._files[index] = None
                    continue
                image_ids = table.column("image_id").combine_chunks()
                owner = (
                    pc.replace_substring_regex(image_ids, FACE_ID_PATTERN, "")
                    if self._align == "all"
                    else image_ids
                )
                self._files[index] = (table, owner)
            found = self._files[index]
            if found is not None:
                tables.append(found[0])
                owners.append(found[1])
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default"), pa.chunked_array(owners, pa.string())


def _unchanged(items: pa.Table, before: pa.Table) -> pa.Array:
    """Each of `items`' row number in PREVIOUS's listing (`before`: its rows in the items' id range, with
    their numbers) when the entry is identical there with a known version, else null."""
    row = pc.index_in(items.column("image_id"), value_set=before.column("image_id"))
    same = pc.and_(pc.is_valid(row), pc.fill_null(pc.not_equal(items.column("version"), ""), False))
    for key in _ITEM_KEY:
        now, then = items.column(key), before.column(key).take(row)
        # equal values, or both null (as Python's None == None); rows without a match are already false
        equal = pc.or_(pc.fill_null(pc.equal(now, then), False), pc.and_(pc.is_null(now), pc.is_null(then)))
        same = pc.and_(same, equal)
    return pc.if_else(same, before.column(_ROW).take(row), pa.scalar(None, pa.int64()))


def carry_by_shard(
    previous: Output,
    plan: Plan,
    pending: Sequence[int],
    listing: pa.Table | str,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[ShardCarry]:
    """What PREVIOUS lets this run carry into each of the `pending` shards (in ascending order), from the
    plan's listing (`listing`: the saved listing's URL, or the listing as a table). An item with a
    `read_error` row in PREVIOUS is left to score, all its rows, and so is one PREVIOUS has no row for."""
    earlier = check_previous(previous, plan)
    align = plan.scoring_config.get("align")
    listing_url = previous.full_url(LISTING_FILE)
    if not with_retries(lambda: previous.fs.exists(previous.path(LISTING_FILE))):
        raise IncrementalError(f"--since {previous.full_url()}: its listing ({LISTING_FILE}) is missing")
    now = _ListingCursor(listing_groups(listing, storage_options))
    before = _ListingCursor(listing_groups(listing_url, previous.storage_options), numbered=True)
    files = _PreviousFiles(previous, align)
    for index in sorted(pending):
        start = index * plan.shard_size
        items = now.rows(start, start + plan.shard_length(index))
        ids = items.column("image_id")
        row = _unchanged(items, before.between(ids[0].as_py(), ids[-1].as_py()))
        rows = _carried_rows(files, ids.filter(pc.is_valid(row)), pc.drop_null(row), earlier.shard_size)
        if rows is None:
            yield ShardCarry(index, items.num_rows, 0, _EMPTY_ROWS, ids)
            continue
        carried = pc.unique(rows.column("item_id"))
        # this run's shard, not PREVIOUS's (the quality table's own column)
        rows = rows.drop_columns([n for n in ("shard",) if n in rows.column_names]).append_column(
            "shard", pa.repeat(pa.scalar(shard_name(index)), rows.num_rows)
        )
        to_score = ids.filter(pc.invert(pc.is_in(ids, value_set=carried)))
        yield ShardCarry(index, items.num_rows, len(carried), rows, to_score)


_EMPTY_ROWS = pa.table({"item_id": pa.array([], pa.string())})


def _carried_rows(
    files: _PreviousFiles, unchanged: pa.Array, rows_before: pa.Array, shard_size: int
) -> pa.Table | None:
    """PREVIOUS's rows of the `unchanged` items (their listing rows there: `rows_before`) with `item_id`
    and `item_rows`, without the items that have a read error; None when there are none."""
    if not len(unchanged):
        return None
    shards = pc.unique(pc.divide(rows_before, shard_size)).to_pylist()
    found = files.rows_of(sorted(shards))
    if found is None:
        return None
    table, owner = found
    keep = pc.is_in(owner, value_set=unchanged)
    # a read error may have been transient (a store that was down): such items are scored again
    retry = pc.and_(keep, pc.equal(table.column("status"), Status.READ_ERROR.value))
    if pc.any(retry).as_py():
        keep = pc.and_(keep, pc.invert(pc.is_in(owner, value_set=pc.unique(owner.filter(retry)))))
    table, owner = table.filter(keep), owner.filter(keep)
    if not table.num_rows:
        return None
    counts = pc.value_counts(owner)  # rows per item, all of them in one file (an item is in one shard)
    item_rows = counts.field("counts").take(pc.index_in(owner, value_set=counts.field("values")))
    return table.append_column("item_id", owner).append_column("item_rows", item_rows.cast(pa.int64()))
