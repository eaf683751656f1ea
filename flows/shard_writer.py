"""The driver's side of scoring: rows arrive in batches, in any order, and each shard is committed the
moment its last row arrives.

Rows stay in the columns they arrive in: a batch is cut into one slice per shard it touches (usually one,
since blocks follow the listing's order) and the slices wait, as numpy arrays, until their shard is
complete. No per-row Python object is made on the driver (`benchmarks/bench_scale.py` measures the rows/s
one core sustains). A shard's file is written whole or not at all (`flows.storage.Output.commit_bytes`), so
a run killed at any moment leaves only complete shards; a rerun skips them.

Rows carried over by `--since` into a shard that still has images to score are set aside in a local Arrow
file until the shard's scored rows arrive (`add_carried`): a nightly run carries most of nearly every shard,
and holding those rows would make the driver's memory grow with the corpus.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fiqa_curator.flows.plan import Plan
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.batch import (
    BATCH_COLUMNS,
    BOOKKEEPING,
    DEVICE_DECODED,
    RUN_ID,
    SCORED_ON,
    batch_from_table,
)
from fiqa_curator.schemas.layout import shard_file, shard_name
from fiqa_curator.schemas.quality_table import PARQUET_OPTIONS, build_quality_table

Columns = dict[str, np.ndarray]


def _rows(batch: Mapping[str, np.ndarray], rows: slice | np.ndarray) -> Columns:
    """The batch's `rows` with the item columns completeness needs: a row without `item_id` is its own
    item (carried rows, runs without --align all), and an item without `item_rows` has one row."""
    piece = {name: values[rows] for name, values in batch.items()}
    if "item_id" not in piece:
        piece["item_id"] = piece["image_id"]
    if "item_rows" not in piece:
        piece["item_rows"] = np.ones(len(piece["image_id"]), dtype=np.int64)
    return piece


def _concatenate(pieces: list[Columns]) -> Columns:
    """One set of columns from several slices; a column some slices lack gets its placeholder there (rows
    carried by --since and rows scored now share a shard, and only carried rows bring a `run_id`)."""
    if len(pieces) == 1:
        return pieces[0]
    names = list(dict.fromkeys(name for piece in pieces for name in piece))
    merged = {}
    for name in names:
        like = next(piece[name] for piece in pieces if name in piece)
        parts = []
        for piece in pieces:
            if name in piece:
                parts.append(piece[name])
            else:
                count = len(piece["image_id"])
                width = like.shape[1] if like.ndim == 2 else None
                parts.append(BATCH_COLUMNS[name].empty(count, width))
        merged[name] = np.concatenate(parts)
    return merged


class ShardWriter:
    """Collects scored rows per shard on the driver and commits a shard the moment it is complete.

    A shard is complete when every one of its items delivered all its rows (`item_rows`: one, or one per
    face with `--align all`). Rows are keyed by image_id, so a row delivered twice (a retried Ray task) is
    written once: the first delivery wins."""

    def __init__(
        self,
        output: Output,
        plan: Plan,
        pending: list[int],
        *,
        run_id: str,
        config: Mapping[str, Any],
        local_folder: str | None = None,
    ):
        """`local_folder`: where rows carried over by --since wait (`add_carried`); by default a temporary
        folder of the writer's own, removed by `close`."""
        self.output = output
        self.config_fingerprint = plan.config_fingerprint
        self.run_id = run_id
        self.config = config
        self.expected = {shard_name(i): plan.shard_length(i) for i in pending}  # items per shard
        self.pieces: dict[str, list[Columns]] = {}
        self.arrived: Counter[str] = Counter()  # rows delivered, repeats included
        self.committed: dict[str, None] = {}  # ordered set
        self.write_seconds = 0.0
        self.rows_by_node: Counter[str] = Counter()
        self.device_decoded = 0
        # --since: rows carried into shards that still have images to score wait on local disk, not in
        # memory (a nightly run carries nearly every shard in part): shard -> (file, items carried)
        self.set_aside: dict[str, tuple[str, int]] = {}
        self._local_folder = local_folder
        self._own_folder: str | None = None

    def add_carried(self, shard: str, rows: pa.Table, items: int) -> None:
        """Rows carried over by --since into `shard` (`incremental.ShardCarry.rows`: `items` items, all
        their rows). When they are the whole shard it is committed now; otherwise they wait in a local file
        until the shard's scored rows arrive."""
        if items == self.expected[shard]:
            self.add(self._carried_columns(rows))
            return
        if self._local_folder is None:
            self._own_folder = self._local_folder = tempfile.mkdtemp(prefix="fiqa-carried-")
        path = os.path.join(self._local_folder, f"carried-{shard}.arrow")
        # zstd: the rows are about 5x smaller than uncompressed (a nightly run sets most of the table aside)
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, rows.schema, options=options) as file:
            file.write_table(rows)
        self.set_aside[shard] = (path, items)

    def _carried_columns(self, rows: pa.Table) -> Columns:
        widths = {
            "exit_scores": int(self.config["exit_depth"]),
            "embedding": int(self.config["model_config"]["embed_dim"]),
        }
        batch = batch_from_table(rows, widths)
        for name in ("item_id", "shard"):
            batch[name] = rows.column(name).to_numpy(zero_copy_only=False).astype(object)
        batch["item_rows"] = rows.column("item_rows").to_numpy(zero_copy_only=False).astype(np.int64)
        return batch

    def close(self) -> None:
        """Remove the files of carried rows still waiting (their shards were not committed: a rerun
        carries them again), and the writer's own folder."""
        for path, _ in self.set_aside.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        self.set_aside.clear()
        if self._own_folder is not None:
            shutil.rmtree(self._own_folder, ignore_errors=True)
            self._own_folder = self._local_folder = None

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        shards = batch["shard"]
        if len(shards) == 0:
            return
        if SCORED_ON.name in batch:
            nodes, counts = np.unique(np.asarray(batch[SCORED_ON.name], dtype=str), return_counts=True)
            self.rows_by_node.update(dict(zip(nodes.tolist(), counts.tolist(), strict=True)))
        if DEVICE_DECODED.name in batch:
            self.device_decoded += int(np.sum(batch[DEVICE_DECODED.name]))
        first = shards[0]
        if shards[-1] == first and bool(np.all(shards == first)):  # the usual case: one shard per batch
            groups: list[tuple[str, slice | np.ndarray]] = [(str(first), slice(None))]
        else:
            names, which = np.unique(np.asarray(shards, dtype=str), return_inverse=True)
            groups = [(str(name), np.flatnonzero(which == k)) for k, name in enumerate(names)]
        for shard, rows in groups:
            if shard not in self.expected:
                raise RuntimeError(f"row for unplanned shard {shard!r}")
            if shard in self.committed:
                continue  # a retried task delivering rows again after their shard was written: already there
            piece = _rows(batch, rows)
            self.pieces.setdefault(shard, []).append(piece)
            self.arrived[shard] += len(piece["image_id"])
            # every item brings at least one row: until as many rows as items arrived, none can be complete
            needed = self.expected[shard] - self._items_set_aside(shard)
            if self.arrived[shard] >= needed:
                merged, unique = self._unique_rows(shard)
                if self._complete_items(merged, unique) == needed:
                    if shard in self.set_aside:
                        merged, unique = self._with_set_aside(shard, merged)
                    self._commit(shard, merged, unique)

    def _items_set_aside(self, shard: str) -> int:
        return self.set_aside[shard][1] if shard in self.set_aside else 0

    def _with_set_aside(self, shard: str, merged: Columns) -> tuple[Columns, np.ndarray]:
        """The shard's rows with its carried rows read back from their local file."""
        path, _ = self.set_aside.pop(shard)
        with pa.memory_map(path) as source:
            carried = self._carried_columns(pa.ipc.open_file(source).read_all())
        os.remove(path)
        self.pieces[shard] = [merged, carried]
        return self._unique_rows(shard)

    def _unique_rows(self, shard: str) -> tuple[Columns, np.ndarray]:
        """The shard's rows so far as one set of columns (kept merged for the next check) and the index of
        each image_id's first delivery, in image_id order."""
        merged = _concatenate(self.pieces[shard])
        self.pieces[shard] = [merged]
        _, unique = np.unique(np.asarray(merged["image_id"], dtype=str), return_index=True)
        return merged, unique

    @staticmethod
    def _complete_items(merged: Columns, unique: np.ndarray) -> int:
        image_ids = merged["image_id"][unique]
        item_ids = merged["item_id"][unique]
        needed = np.asarray(merged["item_rows"][unique], dtype=np.int64)
        if np.all(needed == 1) and np.array_equal(item_ids, image_ids):
            return len(unique)  # each row its own item (the usual case): every distinct row completes one
        items, which, delivered = np.unique(
            np.asarray(item_ids, dtype=str), return_inverse=True, return_counts=True
        )
        required = np.zeros(len(items), dtype=np.int64)
        required[which] = needed
        return int(np.sum(delivered == required))

    def _commit(self, shard: str, merged: Columns, unique: np.ndarray) -> None:
        started = time.perf_counter()
        columns: dict[str, Any] = {
            name: values[unique] for name, values in merged.items() if name not in BOOKKEEPING
        }
        if RUN_ID.name in columns:  # carried rows keep the run that scored them; rows scored now get this run
            run_ids = columns[RUN_ID.name]
            columns[RUN_ID.name] = np.where(run_ids == None, self.run_id, run_ids)  # noqa: E711 - elementwise
        else:
            columns[RUN_ID.name] = self.run_id
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
        pq.write_table(table, buffer, **PARQUET_OPTIONS)
        self.output.commit_bytes(shard_file(shard), buffer.getvalue())
        del self.pieces[shard]
        self.arrived.pop(shard, None)
        self.committed[shard] = None
        self.write_seconds += time.perf_counter() - started

    def missing(self) -> dict[str, int]:
        """Shard -> items still without all their rows, over the shards not committed yet."""
        missing = {}
        for shard, items in self.expected.items():
            if shard in self.committed:
                continue
            complete = self._complete_items(*self._unique_rows(shard)) if shard in self.pieces else 0
            missing[shard] = items - complete - self._items_set_aside(shard)
        return missing
