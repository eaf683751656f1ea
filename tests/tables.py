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
