"""The batches that travel between the scoring pipeline's stages, declared once.

A batch is a `dict[str, np.ndarray]` (Ray Data's numpy format): one array per column, all of one length.
numpy has no null, so a column that may be empty has a placeholder that means null (-1 for sizes and
indices, NaN for scores, "" for an error); `build_quality_table` turns placeholders into nulls and
`batch_from_table` turns nulls back into placeholders.

Stage by stage:

    listing -> reading stage     ITEM_COLUMNS, one row per input item (a file, or a member of a tar)
    reading -> scoring stage     + READ_COLUMNS, one row per face (per item without --align --all-faces),
                                 + what to score: PIXELS, or with --decode device ENCODED and JPEG
    scoring -> writer            + SCORED_COLUMNS (+ EMBEDDING), + SCORED_ON and DEVICE_DECODED; the stage's
                                 inputs (STAGE_INPUTS) are dropped
    writer -> quality table      every column but BOOKKEEPING, plus run_id, model_sha256 and the shard

Rows carried over by `--since` are rebuilt from a previous table (`batch_from_table`) in the writer's
format, so the writer cannot tell them from rows scored now (but for their `run_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fiqa_curator.schemas.quality_table import SCORE_COLUMNS


@dataclass(frozen=True)
class BatchColumn:
    """One column of a batch: its numpy type and the placeholder that means null. `width` is the length
    of each row's vector (face_box: 4); 0 means a width known only at run time (the exit depth, the
    embedding size); None means one value per row."""

    name: str
    dtype: Any
    null: Any
    width: int | None = None

    def empty(self, count: int, width: int | None = None) -> np.ndarray:
        """`count` rows of the placeholder (`width` for a column whose width is known at run time)."""
        if self.width is None:
            return np.full(count, self.null, dtype=self.dtype)
        return np.full((count, width if width is not None else self.width), self.null, dtype=self.dtype)


def _columns(*columns: BatchColumn) -> dict[str, BatchColumn]:
    return {column.name: column for column in columns}


ITEM_COLUMNS = _columns(
    BatchColumn("image_id", object, None),
    BatchColumn("source", object, None),
    BatchColumn("url", object, None),  # what to read: a file, or a tar shard with offset + length
    BatchColumn("offset", np.int64, -1),  # -1: the whole file
    BatchColumn("length", np.int64, -1),
    BatchColumn("identity", object, None),
    BatchColumn("shard", object, None),  # the output shard the item belongs to
)
READ_LOCATION = ("url", "offset", "length")  # consumed by the reading stage, not passed on

READ_COLUMNS = _columns(
    BatchColumn("item_id", object, None),  # the input item a row comes from (its image_id before #faceN)
    BatchColumn("item_rows", np.int64, 1),  # how many rows the item yields: the writer knows when it is whole
    BatchColumn("status", object, None),  # a schemas.Status value
    BatchColumn("error", object, ""),
    BatchColumn("byte_size", np.int64, -1),
    BatchColumn("width", np.int64, -1),
    BatchColumn("height", np.int64, -1),
    BatchColumn("resized", bool, False),
    BatchColumn("face_index", np.int64, -1),
    BatchColumn("faces", np.int64, -1),
    BatchColumn("face_box", np.float32, np.nan, width=4),
    BatchColumn("face_confidence", np.float32, np.nan),
)

# What the scoring stage scores, dropped once scored: (N, size, size, 3) uint8 pixels, or with --decode
# device each row's bytes (the JPEG itself when JPEG is true, else the pixels decoded by the reading stage).
PIXELS = "pixels"
ENCODED = BatchColumn("encoded", object, b"")
JPEG = BatchColumn("jpeg", bool, False)
STAGE_INPUTS = (PIXELS, ENCODED.name, JPEG.name)

SCORED_COLUMNS = _columns(
    BatchColumn("exit_scores", np.float32, np.nan, width=0),  # (N, exit depth), exit 1 first
    *(BatchColumn(name, np.float32, np.nan) for name in SCORE_COLUMNS),
)
EMBEDDING = BatchColumn("embedding", np.float32, np.nan, width=0)  # (N, embed_dim), with --embeddings only
SCORED_ON = BatchColumn("scored_on", object, None)  # the Ray node of the scoring actor (run record)
DEVICE_DECODED = BatchColumn("device_decoded", bool, False)  # decoded by the scoring device (run record)
RUN_ID = BatchColumn("run_id", object, None)  # carried rows keep the run that scored them

# Every column a writer batch may hold, by name (placeholders for the rows of a batch that lacks one).
BATCH_COLUMNS = {
    **ITEM_COLUMNS,
    **READ_COLUMNS,
    **SCORED_COLUMNS,
    **_columns(EMBEDDING, SCORED_ON, DEVICE_DECODED, RUN_ID),
}

# In batches, not in the table.
BOOKKEEPING = ("item_id", "item_rows", SCORED_ON.name, DEVICE_DECODED.name)

# With --align all, an item (a photo) yields one row per face, whose image_id is the item's with "#faceN"
# (N = 0 for the largest face); an item without a face keeps its own id.
FACE_ID_PATTERN = r"#face\d+$"  # for pyarrow.compute.replace_substring_regex


def face_image_id(item_id: str, face_index: int) -> str:
    return f"{item_id}#face{face_index}"


def item_of(image_id: str, align: str | None) -> tuple[str, int]:
    """(the item's id, the face's index in it) of a table row's image_id, for a run aligned with `align`."""
    if align == "all":
        item_id, marker, index = image_id.rpartition("#face")
        if marker and index.isdigit():
            return item_id, int(index)
    return image_id, 0


# The quality-table columns a batch brings back (`batch_from_table`), with their placeholders.
_FROM_TABLE = {
    name: column
    for name, column in {
        **ITEM_COLUMNS,
        **READ_COLUMNS,
        **SCORED_COLUMNS,
        "embedding": EMBEDDING,
        "run_id": RUN_ID,
    }.items()
    if name not in (*READ_LOCATION, "shard", "item_id", "item_rows")
}


def _matrix(column: pa.ChunkedArray, null: Any, dtype: Any, width: int) -> np.ndarray:
    """list<float> -> (N, width) array; null rows filled with `null`."""
    values = column.combine_chunks()
    if width == 0 or len(values) == 0:
        return np.zeros((len(values), width), dtype=dtype)
    filled = pc.fill_null(values, pa.scalar([null] * width, values.type))
    return pc.list_flatten(filled).to_numpy(zero_copy_only=False).reshape(-1, width).astype(dtype)


def batch_from_table(table: pa.Table, widths: dict[str, int]) -> dict[str, np.ndarray]:
    """Rows of a quality table as a writer batch: the same columns and placeholders a scoring batch has
    (the inverse of `build_quality_table` for the columns the table has). `widths` gives the run-time
    widths (`exit_scores`: the exit depth, `embedding`: the embedding size), which a file whose rows all
    failed cannot tell."""
    batch: dict[str, np.ndarray] = {}
    for name, column in _FROM_TABLE.items():
        if name not in table.column_names:
            continue
        values = table.column(name)
        if column.width is not None:
            batch[name] = _matrix(values, column.null, column.dtype, column.width or widths[name])
        elif column.dtype is object:
            batch[name] = np.array(
                [column.null if v is None else v for v in values.to_pylist()], dtype=object
            )
        else:
            batch[name] = (
                pc.fill_null(values, column.null).to_numpy(zero_copy_only=False).astype(column.dtype)
            )
    return batch
