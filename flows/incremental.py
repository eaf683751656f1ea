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

How: the current plan's pending items become one Arrow table (`pending_items`), matched against PREVIOUS's
listing with a hash lookup on image_id and column-wise comparisons (`unchanged_items`); each file of
PREVIOUS is then matched against the unchanged items between its first and last item id (found by binary
search in the sorted ids) with another hash lookup (`carried_batches`). No Python object is made per row
but the writer batches' own (and the image ids `carry_over` hands the pipeline to skip).
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa_curator.flows.plan import Plan, load_plan
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.batch import FACE_ID_PATTERN, batch_from_table
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import LISTING_FILE, SCORES, shard_file
from fiqa_curator.schemas.status import Status

_ITEM_KEY = ("url", "offset", "length", "size", "version")


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


def unchanged_items(previous: Output, plan: Plan, items: pa.Table) -> pa.Table:
    """The items of `items` (a table with `sources.ITEM_SCHEMA`'s columns, as `Plan.pending_listing`
    makes) whose listing entry in PREVIOUS is identical, with a known version: their `image_id` and, when
    `items` has one, `shard` (what `carried_batches` takes), in `items`' order."""
    check_previous(previous, plan)
    raw = previous.read_bytes(LISTING_FILE)
    if raw is None:
        raise IncrementalError(f"--since {previous.full_url()}: its listing ({LISTING_FILE}) is missing")
    before = pq.read_table(io.BytesIO(raw), columns=["image_id", *_ITEM_KEY])
    del raw
    # each item's row in PREVIOUS's listing (a hash join on image_id; image ids are unique in a listing),
    # null where PREVIOUS has none
    row = pc.index_in(items.column("image_id"), value_set=before.column("image_id").combine_chunks())
    same = pc.and_(pc.is_valid(row), pc.fill_null(pc.not_equal(items.column("version"), ""), False))
    for key in _ITEM_KEY:
        now, then = items.column(key), before.column(key).take(row)
        # equal values, or both null (as Python's None == None); rows without a match are already false
        equal = pc.or_(pc.fill_null(pc.equal(now, then), False), pc.and_(pc.is_null(now), pc.is_null(then)))
        same = pc.and_(same, equal)
    return items.select([name for name in ("image_id", "shard") if name in items.column_names]).filter(same)


class _SortedStrings(Sequence):
    """A sorted Arrow string array as the sequence `bisect` searches: one value read per step."""

    def __init__(self, values: pa.Array) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> str:
        return self.values[index].as_py()


def carried_batches(
    previous: Output, unchanged: pa.Table, *, config: Mapping[str, Any]
) -> Iterator[dict[str, np.ndarray]]:
    """PREVIOUS's rows of the `unchanged` items (a table with their `image_id` and their `shard` in this
    run: `unchanged_items`' answer), as writer batches (the columns and placeholders a scoring batch has;
    schemas.batch) with `item_id`, `item_rows` (the item's rows) and `shard`, one batch per committed file
    of PREVIOUS that holds any. An item with a `read_error` row is left out, all its rows: it is scored
    again."""
    if not unchanged.num_rows:
        return
    widths = {"exit_scores": int(config["exit_depth"]), "embedding": int(config["model_config"]["embed_dim"])}
    unchanged = unchanged.select(["image_id", "shard"]).combine_chunks()
    ids = unchanged.column("image_id").combine_chunks()
    if len(ids) > 1 and not pc.all(pc.less_equal(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py():
        unchanged = unchanged.sort_by("image_id").combine_chunks()
        ids = unchanged.column("image_id").combine_chunks()
    shards = unchanged.column("shard").combine_chunks()
    sorted_ids = _SortedStrings(ids)
    for name in sorted(previous.list(SCORES)):
        if not name.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(previous.read_bytes(shard_file(name.removesuffix(".parquet")))))
        if not table.num_rows:
            continue
        image_ids = table.column("image_id")
        owner = (
            pc.replace_substring_regex(image_ids, FACE_ID_PATTERN, "")
            if config["align"] == "all"
            else image_ids
        )
        # The unchanged items this file may hold lie between its first and last item id: a binary search
        # finds them, about a file's worth since each file of PREVIOUS holds consecutive ids (the search
        # is right whatever the files hold; only its cost depends on that).
        bounds = pc.min_max(owner)
        start = bisect.bisect_left(sorted_ids, bounds["min"].as_py())
        stop = bisect.bisect_right(sorted_ids, bounds["max"].as_py(), lo=start)
        if start == stop:
            continue
        # each row's item among them (a hash join on the item id), null for rows of other items
        position = pc.index_in(owner, value_set=ids.slice(start, stop - start))
        keep = pc.is_valid(position)
        # a read error may have been transient (a store that was down): such items are scored again
        retry = pc.and_(keep, pc.equal(table.column("status"), Status.READ_ERROR.value))
        if pc.any(retry).as_py():
            keep = pc.and_(keep, pc.invert(pc.is_in(owner, value_set=pc.unique(owner.filter(retry)))))
        table = table.append_column("item_id", owner).filter(keep)
        if not table.num_rows:
            continue
        owner, position = table.column("item_id"), position.filter(keep)
        rows = pc.value_counts(owner)  # rows per item, all of them in this file (an item is in one shard)
        batch = batch_from_table(table, widths)
        batch["item_id"] = owner.to_numpy(zero_copy_only=False)
        batch["item_rows"] = (
            rows.field("counts").take(pc.index_in(owner, value_set=rows.field("values"))).to_numpy()
        ).astype(np.int64)
        batch["shard"] = shards.slice(start, stop - start).take(position).to_numpy(zero_copy_only=False)
        yield batch
