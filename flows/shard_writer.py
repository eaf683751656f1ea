"""The driver's side of scoring: rows arrive in batches, in any order, and each shard is committed the
moment its last row arrives.

A shard's file is written whole or not at all (`flows.storage.Output.commit_bytes`), so a run killed at
any moment leaves only complete shards; a rerun skips them.
"""

from __future__ import annotations

import io
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from fiqa_curator.flows.plan import Plan
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.batch import BOOKKEEPING, DEVICE_DECODED, EMBEDDING, RUN_ID, SCORED_ON
from fiqa_curator.schemas.layout import shard_file, shard_name
from fiqa_curator.schemas.quality_table import build_quality_table


class ShardWriter:
    """Collects scored rows per shard on the driver and commits a shard the moment it is complete.

    A shard is complete when every one of its items delivered all its rows (`item_rows`: one, or one per
    face with `--align all`). Rows are keyed by image_id, so a row delivered twice (a retried Ray task) is
    written once."""

    def __init__(
        self, output: Output, plan: Plan, pending: list[int], *, run_id: str, config: Mapping[str, Any]
    ):
        self.output = output
        self.config_fingerprint = plan.config_fingerprint
        self.run_id = run_id
        self.config = config
        self.expected = {shard_name(i): len(plan.shard_items(i)) for i in pending}
        # shard -> item_id -> image_id -> row
        self.rows: dict[str, dict[str, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
        self.complete_items: Counter[str] = Counter()
        self.committed: dict[str, None] = {}  # ordered set
        self.write_seconds = 0.0
        self.rows_by_node: Counter[str] = Counter()
        self.device_decoded = 0

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        columns = [column for column in batch if column not in BOOKKEEPING]
        if SCORED_ON.name in batch:
            self.rows_by_node.update(str(node) for node in batch[SCORED_ON.name])
        if DEVICE_DECODED.name in batch:
            self.device_decoded += int(np.sum(batch[DEVICE_DECODED.name]))
        for index, shard in enumerate(batch["shard"]):
            shard = str(shard)
            if shard not in self.expected:
                raise RuntimeError(f"row for unplanned shard {shard!r}")
            if shard in self.committed:
                continue  # a retried task delivering a row again after its shard was written: already there
            image_id = str(batch["image_id"][index])
            item_id = str(batch["item_id"][index]) if "item_id" in batch else image_id
            item_rows = int(batch["item_rows"][index]) if "item_rows" in batch else 1
            item = self.rows[shard][item_id]
            if image_id in item:
                continue
            item[image_id] = {column: batch[column][index] for column in columns}
            item[image_id].setdefault(RUN_ID.name, self.run_id)  # carried rows keep the run that scored them
            if len(item) == item_rows:
                self.complete_items[shard] += 1
                if self.complete_items[shard] == self.expected[shard]:
                    self._commit(shard)

    def _commit(self, shard: str) -> None:
        started = time.perf_counter()
        by_id = {image_id: row for item in self.rows[shard].values() for image_id, row in item.items()}
        rows = [by_id[key] for key in sorted(by_id)]
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        depth = int(self.config["exit_depth"])
        columns["exit_scores"] = (
            np.stack(columns["exit_scores"]) if rows else np.zeros((0, depth), np.float32)
        )
        for name in (EMBEDDING.name, "face_box"):
            if name in columns:
                columns[name] = np.stack(columns[name])
        columns.update(model_sha256=self.config["model_sha256"], shard=shard)
        table = build_quality_table(
            columns,
            metadata={
                "fusion": self.config["fusion"],
                "fusion_weights": self.config["fusion_weights"],
                "config_fingerprint": self.config_fingerprint,
            },
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.output.commit_bytes(shard_file(shard), buffer.getvalue())
        del self.rows[shard]
        self.complete_items.pop(shard, None)
        self.committed[shard] = None
        self.write_seconds += time.perf_counter() - started

    def missing(self) -> dict[str, int]:
        """Shard -> items still without all their rows, over the shards not committed yet."""
        return {
            shard: n - self.complete_items[shard]
            for shard, n in self.expected.items()
            if shard not in self.committed
        }
