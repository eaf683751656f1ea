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
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.plan import LISTING_FILE, Plan, load_plan
from flows.storage import Output
from schemas import SCORE_COLUMNS, exit_score_matrix

_ITEM_KEY = ("url", "offset", "length", "size", "version")
_FACE_SUFFIX = r"#face\d+$"


class IncrementalError(ValueError):
    """PREVIOUS cannot be used for --since."""


def check_previous(previous: Output, plan: Plan) -> Plan:
    """PREVIOUS's plan, when its scores may be carried into `plan`'s table; IncrementalError otherwise."""
    earlier = load_plan(previous)
    if earlier is None:
        raise IncrementalError(f"--since {previous.full_url()}: not a fiqa OUTPUT (no _plan.json)")
    if earlier.config_fingerprint != plan.config_fingerprint:
        changed = sorted(k for k in set(earlier.scoring_config) | set(plan.scoring_config)
                         if earlier.scoring_config.get(k) != plan.scoring_config.get(k))
        raise IncrementalError(f"--since {previous.full_url()} was scored with another configuration "
                               f"({', '.join(changed)}): its scores cannot be carried over into this table")
    return earlier


def unchanged_items(previous: Output, plan: Plan, items: Iterable[Any]) -> set[str]:
    """image_ids of `items` whose listing entry in PREVIOUS is identical, with a known version."""
    check_previous(previous, plan)
    raw = previous.read_bytes(LISTING_FILE)
    if raw is None:
        raise IncrementalError(f"--since {previous.full_url()}: its listing ({LISTING_FILE}) is missing")
    listing = pq.read_table(io.BytesIO(raw), columns=["image_id", *_ITEM_KEY]).to_pylist()
    before = {row["image_id"]: tuple(row[k] for k in _ITEM_KEY) for row in listing}
    return {item.image_id for item in items
            if item.version and before.get(item.image_id) == (item.url, item.offset, item.length, item.size,
                                                               item.version)}


def _filled(column: pa.ChunkedArray, value: Any) -> np.ndarray:
    return pc.fill_null(column, value).to_numpy(zero_copy_only=False)


def carried_batches(
    previous: Output, item_ids: set[str], shard_of_item: Mapping[str, str], *, align: str | None,
) -> list[dict[str, np.ndarray]]:
    """PREVIOUS's rows of the given items, as writer batches (the columns a scoring batch has, with
    the same null sentinels), one batch per committed file of PREVIOUS."""
    batches = []
    for name in sorted(previous.list("scores")):
        if not name.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(previous.read_bytes(f"scores/{name}")))
        ids = table.column("image_id")
        owner = pc.replace_substring_regex(ids, _FACE_SUFFIX, "") if align == "all" else ids
        table = table.append_column("item_id", owner).filter(pc.is_in(owner, pa.array(sorted(item_ids), pa.string())))
        if not table.num_rows:
            continue
        # a read error may have been transient (a store that was down): such images are scored again
        retry = pc.equal(table.column("status"), "read_error")
        if pc.any(retry).as_py():
            failed = pc.unique(table.filter(retry).column("item_id"))
            table = table.filter(pc.invert(pc.is_in(table.column("item_id"), failed)))
            if not table.num_rows:
                continue
        owners = table.column("item_id").to_pylist()
        counts: dict[str, int] = {}
        for owner_id in owners:
            counts[owner_id] = counts.get(owner_id, 0) + 1
        box = table.column("face_box").combine_chunks()
        face_box = pc.list_flatten(pc.fill_null(box, pa.scalar([np.nan] * 4, box.type))).to_numpy(
            zero_copy_only=False).reshape(-1, 4)
        batch = {
            "image_id": np.array(table.column("image_id").to_pylist(), dtype=object),
            "source": np.array(table.column("source").to_pylist(), dtype=object),
            "identity": np.array(table.column("identity").to_pylist(), dtype=object),
            "status": np.array(table.column("status").to_pylist(), dtype=object),
            "error": np.array([e or "" for e in table.column("error").to_pylist()], dtype=object),
            "byte_size": _filled(table.column("byte_size"), -1).astype(np.int64),
            "width": _filled(table.column("width"), -1).astype(np.int64),
            "height": _filled(table.column("height"), -1).astype(np.int64),
            "resized": _filled(table.column("resized"), False).astype(bool),
            "face_index": _filled(table.column("face_index"), -1).astype(np.int64),
            "faces": _filled(table.column("faces"), -1).astype(np.int64),
            "face_box": face_box.astype(np.float32),
            "face_confidence": _filled(table.column("face_confidence"), np.nan).astype(np.float32),
            "exit_scores": exit_score_matrix(table).astype(np.float32),
            **{column: _filled(table.column(column), np.nan).astype(np.float32) for column in SCORE_COLUMNS},
            "run_id": np.array(table.column("run_id").to_pylist(), dtype=object),
            "shard": np.array([shard_of_item[o] for o in owners], dtype=object),
            "item_id": np.array(owners, dtype=object),
            "item_rows": np.array([counts[o] for o in owners], dtype=np.int64),
        }
        if "embedding" in table.column_names:
            embedding = table.column("embedding").combine_chunks()
            width = int(pc.max(pc.list_value_length(embedding)).as_py() or 0)
            filled = pc.fill_null(embedding, pa.scalar([np.nan] * width, embedding.type))
            batch["embedding"] = pc.list_flatten(filled).to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32)
        batches.append(batch)
    return batches
