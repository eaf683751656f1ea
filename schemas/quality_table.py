"""The quality table: one row per input image, bad ones included (`fiqa score` output, `OUTPUT/scores/`).

Columns (README "Quality table" documents them for analysts):

| column          | type              | meaning                                                             |
|-----------------|-------------------|---------------------------------------------------------------------|
| image_id        | string            | stable id: path relative to INPUT, manifest id, or tar + member key |
| source          | string            | the URI that was read (`tar_url#member` inside WebDataset shards)   |
| identity        | string, nullable  | subject identity when the manifest / shard provides one             |
| status          | string            | `ok` or the reason: decode_error, unsupported_format, too_large,    |
|                 |                   | read_error, no_face (`--align` found no face)                       |
| error           | string, nullable  | human-readable reason when status is not ok                         |
| byte_size       | int64, nullable   | size of the bytes read                                              |
| width, height   | int32, nullable   | decoded size (after EXIF orientation), before resizing              |
| resized         | bool, nullable    | whether the image was resampled to the model's input size           |
| face_index      | int16, nullable   | `--align`: which face of the photo (0 = largest); null otherwise    |
| faces           | int16, nullable   | `--align`: faces the detector found in the photo (0 with `no_face`) |
| face_box        | list<float32>     | `--align`: detected box x0, y0, x1, y1 in the photo's pixels        |
| face_confidence | float32, nullable | `--align`: detector score (dlib HOG SVM margin; > 0 = detected)     |
| exit_depth      | int16             | L: blocks 1..L were run                                             |
| exit_scores     | list<float32>     | EX-FIQA score of exits 1..L (exit 1 first); null when not ok        |
| quality_final   | float32, nullable | score of exit L (the ViT-FIQA score when L is the model depth)      |
| quality_f       | float32, nullable | EX-FIQA-F: uniform fusion of exits 1..L                             |
| quality_fw      | float32, nullable | EX-FIQA-FW: depth-weighted fusion of exits 1..L                     |
| quality         | float32, nullable | the configured fusion (`fusion` in the file metadata)               |
| model_sha256    | string            | sha256 of the checkpoint bytes                                      |
| run_id          | string            | the run that wrote the row                                          |
| shard           | string            | shard name (`shard-00000`)                                          |
| embedding       | list<float32>     | optional (`--embeddings`): the model's face embedding, full depth   |

Higher quality = more useful for face recognition. File metadata: `fiqa.schema_version`, `fiqa.fusion`,
`fiqa.fusion_weights` (JSON), `fiqa.config_fingerprint`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fiqa_curator.schemas.status import STATUS_VALUES, Status

SCHEMA_VERSION = "2"  # 2: face_index, faces, face_box, face_confidence (`--align`), status no_face

_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("identity", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("byte_size", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("resized", pa.bool_()),
    pa.field("face_index", pa.int16()),
    pa.field("faces", pa.int16()),
    pa.field("face_box", pa.list_(pa.float32())),
    pa.field("face_confidence", pa.float32()),
    pa.field("exit_depth", pa.int16(), nullable=False),
    pa.field("exit_scores", pa.list_(pa.float32())),
    pa.field("quality_final", pa.float32()),
    pa.field("quality_f", pa.float32()),
    pa.field("quality_fw", pa.float32()),
    pa.field("quality", pa.float32()),
    pa.field("model_sha256", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
]
QUALITY_TABLE_SCHEMA = pa.schema(_FIELDS, metadata={"fiqa.schema_version": SCHEMA_VERSION})
# Optional last column, written only by `fiqa score --embeddings` (full depth): the official `feature` output.
EMBEDDING_FIELD = pa.field("embedding", pa.list_(pa.float32()))
SCORE_COLUMNS = ("quality_final", "quality_f", "quality_fw", "quality")

# How a shard is written. Dictionary encoding only for the columns whose values repeat: with it on every
# column (pyarrow's default), a shard of 5,000 rows with 12 exits took 2.3x as long to write and came out
# 1.55x as large, the scores and ids hardly repeating (benchmarks/bench_scale.py, docs/benchmarks.md).
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": [
        "identity",
        "status",
        "error",
        "width",
        "height",
        "resized",
        "face_index",
        "faces",
        "exit_depth",
        "model_sha256",
        "run_id",
        "shard",
    ],
}


def _nullable_numbers(values: Sequence[Any] | np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """Numbers with sentinels (NaN; negative for integer columns) -> an Arrow array with nulls."""
    array = np.asarray(values, dtype=np.float64)
    mask = ~np.isfinite(array)
    if pa.types.is_integer(arrow_type):
        mask |= array < 0
    return pa.array(np.where(mask, 0, array).astype(arrow_type.to_pandas_dtype()), type=arrow_type, mask=mask)


def _nullable_strings(values: Sequence[Any] | np.ndarray) -> pa.Array:
    """Strings where None, NaN (what an all-null column becomes in a numpy batch) and "" mean null."""

    def clean(value: Any) -> str | None:
        if (
            value is None
            or (isinstance(value, float | np.floating) and not np.isfinite(value))
            or value == ""
        ):
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    try:  # the usual column, str and None (or NaN): converted by Arrow, not value by value in Python
        array = pa.array(values, type=pa.string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # bytes, numbers, infinities
        return pa.array([clean(v) for v in values], type=pa.string())
    return pc.if_else(pc.equal(array, ""), pa.scalar(None, pa.string()), array)


def _list_column(rows: np.ndarray, null: np.ndarray) -> pa.Array:
    """(N, K) float32 -> list<float32>, null where `null`."""
    count, width = rows.shape
    offsets = pa.array(np.arange(0, (count + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(
        offsets, pa.array(rows.reshape(-1), type=pa.float32()), mask=pa.array(null)
    )


def build_quality_table(columns: Mapping[str, Any], *, metadata: Mapping[str, Any]) -> pa.Table:
    """Build and validate one shard's table from column arrays.

    Numbers use sentinels for null: NaN for scores, a negative value for sizes; `exit_scores` is an
    (N, L) float array whose rows are null where the status is not ok.
    """
    status = np.asarray(columns["status"], dtype=object)
    unknown = set(status.tolist()) - set(STATUS_VALUES)
    if unknown:
        raise ValueError(f"unknown status values: {sorted(unknown)}")
    ok = status == Status.OK
    count = len(status)
    exit_scores = np.asarray(columns["exit_scores"], dtype=np.float32).reshape(count, -1)
    depth = exit_scores.shape[1]
    face_box = np.asarray(columns.get("face_box", np.full((count, 4), np.nan)), dtype=np.float32).reshape(
        count, 4
    )
    arrays = {
        "image_id": pa.array(columns["image_id"], type=pa.string()),
        "source": pa.array(columns["source"], type=pa.string()),
        "identity": _nullable_strings(columns.get("identity", [None] * count)),
        "status": pa.array(status, type=pa.string()),
        "error": _nullable_strings(columns["error"]),
        "byte_size": _nullable_numbers(columns["byte_size"], pa.int64()),
        "width": _nullable_numbers(columns["width"], pa.int32()),
        "height": _nullable_numbers(columns["height"], pa.int32()),
        "resized": pa.array(np.asarray(columns["resized"], dtype=bool), type=pa.bool_(), mask=~ok),
        "face_index": _nullable_numbers(columns.get("face_index", np.full(count, -1)), pa.int16()),
        "faces": _nullable_numbers(columns.get("faces", np.full(count, -1)), pa.int16()),
        "face_box": _list_column(face_box, ~np.isfinite(face_box).all(axis=1)),
        "face_confidence": _nullable_numbers(
            columns.get("face_confidence", np.full(count, np.nan)), pa.float32()
        ),
        "exit_depth": pa.array(np.full(count, depth, dtype=np.int16), type=pa.int16()),
        "exit_scores": _list_column(exit_scores, ~ok),
        **{
            name: _nullable_numbers(np.where(ok, columns[name], np.nan), pa.float32())
            for name in SCORE_COLUMNS
        },
        "model_sha256": pa.repeat(pa.scalar(columns["model_sha256"], pa.string()), count),
        # one run id for the shard, or one per row (rows carried over by `--since` keep their run's id)
        "run_id": (
            pa.repeat(pa.scalar(columns["run_id"], pa.string()), count)
            if isinstance(columns["run_id"], str)
            else pa.array([str(r) for r in columns["run_id"]], type=pa.string())
        ),
        "shard": pa.repeat(pa.scalar(columns["shard"], pa.string()), count),
    }
    schema_metadata = {
        **QUALITY_TABLE_SCHEMA.metadata,
        **{
            f"fiqa.{key}".encode(): (value if isinstance(value, str) else json.dumps(value)).encode()
            for key, value in metadata.items()
        },
    }
    fields = list(_FIELDS)
    if columns.get("embedding") is not None:  # only when scored with --embeddings
        arrays["embedding"] = _list_column(
            np.asarray(columns["embedding"], dtype=np.float32).reshape(count, -1), ~ok
        )
        fields.append(EMBEDDING_FIELD)
    schema = pa.schema(fields, metadata=schema_metadata)
    table = pa.Table.from_arrays([arrays[f.name] for f in fields], schema=schema)
    table.validate(full=True)
    return table


def exit_score_matrix(table: pa.Table) -> np.ndarray:
    """(N, L) float64 exit scores of a quality table (exit 1 first), NaN rows where a row has none.
    Goes through Arrow buffers, not Python lists: a million rows stay a few hundred MB."""
    depth = int(pc.max(table.column("exit_depth")).as_py() or 0) if table.num_rows else 0
    if depth == 0:
        return np.zeros((table.num_rows, 0))
    filled = pc.fill_null(
        table.column("exit_scores").combine_chunks(), pa.scalar([np.nan] * depth, pa.list_(pa.float32()))
    )
    return pc.list_flatten(filled).to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, depth)
