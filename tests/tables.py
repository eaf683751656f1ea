"""Synthetic quality tables for the analysts' tests (report, select, query): the columns a table needs,
with plain defaults that a test overrides where it matters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from fiqa_curator.schemas import build_quality_table


def synthetic_table(
    ids: Sequence[str], status: Sequence[str], exits: np.ndarray, quality: np.ndarray, **columns: Any
) -> pa.Table:
    """A quality table of len(ids) rows: 112x112 images, F = mean of the exits, FW = `quality`; failed
    rows read "broken". Any column can be given instead of its default."""
    count = len(ids)
    defaults = {
        "image_id": list(ids),
        "source": list(ids),
        "status": list(status),
        "error": ["" if s == "ok" else "broken" for s in status],
        "byte_size": [10] * count,
        "width": [112] * count,
        "height": [112] * count,
        "resized": [False] * count,
        "exit_scores": exits,
        "quality_final": exits[:, -1],
        "quality_f": exits.mean(1),
        "quality_fw": quality,
        "quality": quality,
        "model_sha256": "m",
        "run_id": "r",
        "shard": "shard-00000",
    }
    return build_quality_table({**defaults, **columns}, metadata={"fusion": "fw"})


def tied_table(count: int = 240, seed: int = 5):
    """Scores from a few values (long runs of ties), failures, and NaN / infinite scores of ok rows."""
    rng = np.random.default_rng(seed)
    exits = (rng.integers(0, 5, size=(count, 3)) / 4).astype(np.float32)
    exits[rng.random((count, 3)) < 0.05] = np.nan
    quality = (rng.integers(0, 7, size=count) / 3).astype(np.float32)
    quality[::11] = rng.normal(size=len(quality[::11])).astype(np.float32)  # a few distinct values too
    status = np.array(["ok"] * count, dtype=object)
    status[rng.random(count) < 0.1] = "decode_error"
    status[:3] = ["too_large", "read_error", "no_face"]
    ids = [f"img_{i:04d}.jpg" for i in rng.permutation(count)]  # file order is not id order
    errors = ["" if s == "ok" or i == 1 else "broken" for i, s in enumerate(status)]
    table = synthetic_table(ids, status, exits, quality, source=[f"s3://b/{i}" for i in ids], error=errors)
    # build_quality_table turns NaN into null; the table may still hold NaN and infinities: put some back,
    # and nulls in ok rows (a whole list of exit scores, or one exit)
    values = table.column("quality").to_numpy(zero_copy_only=False).astype(np.float32)
    ok = np.flatnonzero(status == "ok")
    values[ok[:4]], values[ok[4:6]], values[ok[6:8]] = np.nan, np.inf, -np.inf
    quality_column = pa.array(values, type=pa.float32(), mask=np.isin(np.arange(count), ok[8:10]))
    exit_lists = table.column("exit_scores").to_pylist()
    exit_lists[ok[10]], exit_lists[ok[11]] = None, [0.5, None, 0.5]
    for name, column in (("quality", quality_column), ("exit_scores", exit_lists)):
        index = table.schema.get_field_index(name)
        field = table.schema.field(index)
        table = table.set_column(index, field, pa.array(column, type=field.type))
    return table
