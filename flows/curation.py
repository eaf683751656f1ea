"""`fiqa select`: keep/drop lists from a quality table, by a drop fraction or a minimum quality.

Every row gets a decision: images that could not be scored are dropped with their status as the reason;
scored images are ranked by the chosen column (ties broken by image_id, so the lists never change between
runs) and the lowest are dropped. Writes OUTPUT/curation/keep.parquet, drop.parquet (image_id, source,
quality, reason) and selection.json (the threshold and the counts).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import CURATION, SCORES
from fiqa_curator.schemas.quality_table import SCORE_COLUMNS, exit_score_matrix
from fiqa_curator.schemas.status import Status

_EXIT = re.compile(r"^exit_(\d+)$")
LIST_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source", pa.string()), ("quality", pa.float32()), ("reason", pa.string())]
)


@dataclass
class Selection:
    by: str
    rule: str
    threshold: float | None
    kept: int
    dropped_low_quality: int
    dropped_unscored: int
    output: str


def _score_column(table: pa.Table, by: str) -> np.ndarray:
    if by in SCORE_COLUMNS:
        return table.column(by).to_numpy(zero_copy_only=False).astype("float64")
    match = _EXIT.match(by)
    if match:
        exits = exit_score_matrix(table)
        exit_index = int(match.group(1))
        if not 1 <= exit_index <= exits.shape[1]:
            raise UserError(f"--by {by}: the table has exits 1..{exits.shape[1]}")
        return exits[:, exit_index - 1]
    raise UserError(f"--by must be one of {', '.join(SCORE_COLUMNS)} or exit_<k>, got {by!r}")


def select(
    output_url: str,
    *,
    drop_fraction: float | None = None,
    min_quality: float | None = None,
    by: str = "quality",
    storage_options: Mapping[str, Any] | None = None,
) -> Selection:
    if (drop_fraction is None) == (min_quality is None):
        raise UserError("give exactly one of --drop-fraction or --min-quality")
    if drop_fraction is not None and not 0 <= drop_fraction <= 1:
        raise UserError(f"--drop-fraction must be in [0, 1], got {drop_fraction}")
    output = Output(output_url, storage_options)
    output.require_table(finished=True)
    columns = ["image_id", "source", "status", "error", "exit_depth", "exit_scores", *SCORE_COLUMNS]
    table = pq.read_table(output.path(SCORES), columns=columns, filesystem=output.fs)
    scores = _score_column(table, by)
    rows = table.select(["image_id", "source", "status", "error"]).to_pylist()
    scored = sorted(
        (i for i, row in enumerate(rows) if row["status"] == Status.OK and math.isfinite(scores[i])),
        key=lambda i: (scores[i], rows[i]["image_id"]),
    )
    if drop_fraction is not None:
        cut = math.floor(drop_fraction * len(scored) + 1e-9)
        low, threshold = scored[:cut], (float(scores[scored[cut - 1]]) if cut else None)
        rule = f"drop the lowest {drop_fraction:g} of scored images by {by} (ties by image_id)"
        reason = f"in the lowest {drop_fraction:g} by {by}"
    else:
        low = [i for i in scored if scores[i] < min_quality]
        threshold, rule = float(min_quality), f"drop scored images with {by} < {min_quality:g}"
        reason = f"{by} < {min_quality:g}"
    low_set = set(low)
    keep, drop = [], []
    for i, row in enumerate(rows):
        quality = float(scores[i]) if math.isfinite(scores[i]) else None
        record = {"image_id": row["image_id"], "source": row["source"], "quality": quality}
        if row["status"] != Status.OK:
            drop.append({**record, "reason": f"{row['status']}: {row['error'] or ''}".rstrip(": ")})
        elif quality is None:
            drop.append({**record, "reason": f"no finite {by} score"})
        elif i in low_set:
            drop.append({**record, "reason": reason})
        else:
            keep.append({**record, "reason": "kept"})
    for name, records in (("keep", keep), ("drop", drop)):
        records.sort(key=lambda r: r["image_id"])
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=LIST_SCHEMA), buffer)
        output.commit_bytes(f"{CURATION}/{name}.parquet", buffer.getvalue())
    selection = Selection(
        by=by,
        rule=rule,
        threshold=threshold,
        kept=len(keep),
        dropped_low_quality=len(low),
        dropped_unscored=len(drop) - len(low),
        output=output.full_url(CURATION),
    )
    output.commit_bytes(f"{CURATION}/selection.json", json.dumps(asdict(selection), indent=1).encode())
    return selection
