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
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
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


def unchanged_items(previous: Output, plan: Plan, items: Iterable[Any]) -> set[str]:
    """image_ids of `items` whose listing entry in PREVIOUS is identical, with a known version."""
    check_previous(previous, plan)
    raw = previous.read_bytes(LISTING_FILE)
    if raw is None:
        raise IncrementalError(f"--since {previous.full_url()}: its listing ({LISTING_FILE}) is missing")
    listing = pq.read_table(io.BytesIO(raw), columns=["image_id", *_ITEM_KEY]).to_pylist()
    before = {row["image_id"]: tuple(row[k] for k in _ITEM_KEY) for row in listing}
    return {
        item.image_id
        for item in items
        if item.version
        and before.get(item.image_id) == (item.url, item.offset, item.length, item.size, item.version)
    }


def carried_batches(
    previous: Output,
    item_ids: set[str],
    shard_of_item: Mapping[str, str],
    *,
    config: Mapping[str, Any],
) -> Iterator[dict[str, np.ndarray]]:
    """PREVIOUS's rows of the given items, as writer batches (the columns and placeholders a scoring batch
    has; schemas.batch), one batch per committed file of PREVIOUS."""
    widths = {"exit_scores": int(config["exit_depth"]), "embedding": int(config["model_config"]["embed_dim"])}
    wanted = pa.array(sorted(item_ids), pa.string())
    for name in sorted(previous.list(SCORES)):
        if not name.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(previous.read_bytes(shard_file(name.removesuffix(".parquet")))))
        ids = table.column("image_id")
        owner = pc.replace_substring_regex(ids, FACE_ID_PATTERN, "") if config["align"] == "all" else ids
        table = table.append_column("item_id", owner).filter(pc.is_in(owner, wanted))
        if not table.num_rows:
            continue
        # a read error may have been transient (a store that was down): such images are scored again
        retry = pc.equal(table.column("status"), Status.READ_ERROR.value)
        if pc.any(retry).as_py():
            failed = pc.unique(table.filter(retry).column("item_id"))
            table = table.filter(pc.invert(pc.is_in(table.column("item_id"), failed)))
            if not table.num_rows:
                continue
        owners = table.column("item_id").to_pylist()
        counts = Counter(owners)
        batch = batch_from_table(table, widths)
        batch["item_id"] = np.array(owners, dtype=object)
        batch["item_rows"] = np.array([counts[o] for o in owners], dtype=np.int64)
        batch["shard"] = np.array([shard_of_item[o] for o in owners], dtype=object)
        yield batch
