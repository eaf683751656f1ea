"""The scoring pipeline's reading stage, one task per shard: the shard's items from the plan's saved
listing, then their bytes read and decoded, `block_rows` at a time.

The driver hands Ray Data one small row per pending shard (`plan.shard_tasks`), never the items. A task
takes one shard (batch size 1: Ray Data bundles a stage's input rows up to its batch size, and fused with
a stage of `block_rows` it would give one task 64 or 1,024 shards to read one after another), reads its
rows from `_plan/listing.parquet` (one row group; the footer once per worker process) or, when OUTPUT is
on a local disk that other nodes cannot see, from the listing's bytes in Ray's object store, and yields
decoded blocks as it goes, so that the scoring actors start on a shard before it is all decoded.

No torch here: these tasks start in a fraction of a second (`workers` imports lazily).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from fiqa_curator.flows.plan import shard_items


def read_shards(
    tasks: pa.Table,
    *,
    listing: Any,
    key: str,
    storage_options: Mapping[str, Any] | None,
    block_rows: int,
    read_options: Mapping[str, Any],
) -> Iterator[dict[str, np.ndarray]]:
    """A Ray Data stage (`batch_format="pyarrow"`, `batch_size=1`): shard descriptions -> decoded rows
    (`workers.reading.read_and_decode`'s output), `block_rows` items at a time. `listing`: the saved
    listing's URL, or an object reference to its bytes; `key`: its fingerprint."""
    from fiqa_curator.workers.reading import read_and_decode

    source = listing
    if not isinstance(listing, str):
        import ray

        source = pa.py_buffer(ray.get(listing))  # a read-only view of the object store's copy
    for task in tasks.to_pylist():
        items = shard_items(task, source, storage_options, key=key)
        for start in range(0, items.num_rows, block_rows):
            chunk = items.slice(start, block_rows)
            batch = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
            yield read_and_decode(batch, storage_options=storage_options, **read_options)
