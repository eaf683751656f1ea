"""`fiqa select`: keep/drop lists from a quality table, by a drop fraction or a minimum quality, and by
the identity results of `fiqa identities` (outliers, near-duplicates, identities left too small).

Every row gets a decision: images that could not be scored are dropped with their status as the reason;
scored images are ranked by the chosen column (ties broken by image_id, so the lists never change between
runs) and the lowest are dropped. A dropped row's reason names the first rule that dropped it, in this
order (`RULES`): not scored, no finite score, low quality, identity outlier, near-duplicate, identity
left with fewer than `--min-identity-images` images (counted after every earlier rule). Writes
OUTPUT/curation/keep.parquet, drop.parquet (image_id, source, quality, reason; sorted by image_id) and
selection.json (the threshold and the counts).

Everything runs in DuckDB (`flows.table_sql`) under its memory limit (`--memory-limit`); nothing holds
the table in Python. The drop fraction's threshold is an exact order statistic (`order_statistics`, no sort
of the table), the rows tied at it are split by image_id in SQL, and the lists stream into OUTPUT in
image_id order: one shard at a time, each sorted on its own (`files_in_id_order`: a fiqa table's shards are
ranges of ids), or, for a table whose files' ranges overlap, through one sort that spills to disk. Image
ids are unique in a quality table (`fiqa score` refuses duplicates), which the split relies on.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa_curator.flows.storage import Output
from fiqa_curator.flows.table_sql import (
    double,
    files_in_id_order,
    local_or_url,
    memory_limit_bytes,
    order_statistics,
    quality_table,
    quote,
    scalar,
)
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import CURATION, IDENTITY_IMAGES_FILE, IDENTITY_SUMMARY_FILE
from fiqa_curator.schemas.quality_table import SCORE_COLUMNS
from fiqa_curator.schemas.status import Status

_EXIT = re.compile(r"^exit_(\d+)$")
LIST_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source", pa.string()), ("quality", pa.float32()), ("reason", pa.string())]
)


RULES = ("not scored", "no finite score", "low quality", "outlier", "duplicate", "small identity")


@dataclass
class Selection:
    by: str
    rule: str
    threshold: float | None
    kept: int
    dropped_low_quality: int
    dropped_unscored: int
    output: str
    dropped_outliers: int = 0
    dropped_duplicates: int = 0
    dropped_small_identities: int = 0  # images of identities left with fewer than min_identity_images
    rules: tuple[str, ...] = RULES  # the order in which a dropped row's reason is chosen


def score_expression(connection: duckdb.DuckDBPyConnection, by: str) -> str:
    """The SQL (DOUBLE) of `--by` over the view `scores`."""
    if by in SCORE_COLUMNS:
        return f'CAST("{by}" AS DOUBLE)'
    match = _EXIT.match(by)
    if match:
        depth = int(scalar(connection, "SELECT max(exit_depth) FROM scores") or 0)
        exit_index = int(match.group(1))
        if not 1 <= exit_index <= depth:
            raise UserError(f"--by {by}: the table has exits 1..{depth}")
        return f"CAST(exit_scores[{exit_index}] AS DOUBLE)"  # DuckDB lists are 1-based
    raise UserError(f"--by must be one of {', '.join(SCORE_COLUMNS)} or exit_<k>, got {by!r}")


def _lowest(
    connection: duckdb.DuckDBPyConnection, score: str, scored: str, cut: int
) -> tuple[str, float | None]:
    """The condition that holds for the `cut` lowest scored rows by (score, image_id), and the score of
    the last of them (None when `cut` is 0)."""
    if cut == 0:
        return "FALSE", None
    threshold = order_statistics(connection, f"scores WHERE {scored}", score, [cut - 1])[cut - 1]
    at = double(threshold)
    below, tied = connection.execute(
        f"SELECT count(*) FILTER (WHERE {score} < {at}), count(*) FILTER (WHERE {score} = {at}) "
        f"FROM scores WHERE {scored}"
    ).fetchone()
    wanted = cut - below  # of the rows at the threshold, the first `wanted` by image_id go
    if not 1 <= wanted <= tied:
        raise RuntimeError(f"order statistic {threshold!r} at rank {cut - 1} disagrees with the table")
    if wanted == tied:
        return f"{score} <= {at}", threshold
    last = scalar(
        connection,
        f"SELECT image_id FROM (SELECT image_id, row_number() OVER (ORDER BY image_id) AS k "
        f"FROM scores WHERE {scored} AND {score} = {at}) WHERE k = {wanted}",
    )
    return f"({score} < {at} OR ({score} = {at} AND image_id <= {quote(last)}))", threshold


FLAGS = ("kept", "scored", "low", "outlier", "duplicate", "small")


def _write_lists(connection: duckdb.DuckDBPyConnection, output: Output, decisions: str) -> Counter[str]:
    """keep.parquet and drop.parquet, in image_id order, from `decisions` (SQL with a `{relation}` to read
    and the FLAGS, each true where that rule decided the row): streamed a batch at a time into local files,
    then committed to OUTPUT. Returns the rows and the count of each flag, counted on the way (no second
    scan)."""
    counts: Counter[str] = Counter()
    files = files_in_id_order(connection, output)
    relations = [f"read_parquet({quote(name)})" for name in files] if files is not None else ["scores"]
    with tempfile.TemporaryDirectory(prefix="fiqa-select-") as folder:
        paths = {name: os.path.join(folder, f"{name}.parquet") for name in ("keep", "drop")}
        writers = {
            name: pq.ParquetWriter(path, LIST_SCHEMA, compression="zstd") for name, path in paths.items()
        }
        try:
            for relation in relations:
                for batch in connection.sql(decisions.format(relation=relation)).to_arrow_reader(65_536):
                    counts["rows"] += batch.num_rows
                    for flag in FLAGS:
                        counts[flag] += pc.sum(batch.column(flag)).as_py() or 0
                    kept = batch.column("kept")
                    for name, rows in (("keep", kept), ("drop", pc.invert(kept))):
                        chosen = pa.Table.from_batches([batch]).filter(rows).select(LIST_SCHEMA.names)
                        writers[name].write_table(chosen.cast(LIST_SCHEMA))
        finally:
            for writer in writers.values():
                writer.close()
        for name, path in paths.items():
            output.commit_file(f"{CURATION}/{name}.parquet", path)
    return counts


def _require_identity_results(output: Output) -> None:
    """UserError unless `fiqa identities` ran on this very table."""
    raw = output.read_bytes(IDENTITY_SUMMARY_FILE)
    if raw is None or not output.fs.exists(output.path(IDENTITY_IMAGES_FILE)):
        raise UserError(
            f"{output.url} has no identity results: run `fiqa identities {output.url}` before "
            f"--drop-outliers, --drop-duplicates or --min-identity-images"
        )
    if json.loads(raw).get("table") != output.table_fingerprint():
        raise UserError(
            f"the quality table changed since `fiqa identities` ran: run `fiqa identities {output.url}` again"
        )


def select(
    output_url: str,
    *,
    drop_fraction: float | None = None,
    min_quality: float | None = None,
    by: str = "quality",
    drop_outliers: bool = False,
    drop_duplicates: bool = False,
    min_identity_images: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    memory_limit: str | None = None,
) -> Selection:
    identity_rules = drop_outliers or drop_duplicates or min_identity_images is not None
    if drop_fraction is not None and min_quality is not None:
        raise UserError("give at most one of --drop-fraction or --min-quality")
    if drop_fraction is None and min_quality is None and not identity_rules:
        raise UserError(
            "give a rule: --drop-fraction or --min-quality, and/or --drop-outliers, --drop-duplicates, "
            "--min-identity-images"
        )
    if drop_fraction is not None and not 0 <= drop_fraction <= 1:
        raise UserError(f"--drop-fraction must be in [0, 1], got {drop_fraction}")
    if min_identity_images is not None and min_identity_images < 1:
        raise UserError(f"--min-identity-images must be at least 1, got {min_identity_images}")
    memory_limit_bytes(memory_limit)  # a bad --memory-limit fails before OUTPUT is read
    output = Output(output_url, storage_options)
    output.require_table(finished=True)
    if identity_rules:
        _require_identity_results(output)
    with quality_table(output, memory_limit=memory_limit) as connection:
        score = score_expression(connection, by)
        # DuckDB orders NaN above every number (and NaN = NaN), so non-finite scores are set aside first
        scored = f"(status = {quote(Status.OK.value)} AND coalesce(isfinite({score}), false))"
        threshold: float | None = None
        rules: list[str] = []
        if drop_fraction is not None:
            count = scalar(connection, f"SELECT count(*) FROM scores WHERE {scored}")
            low, threshold = _lowest(connection, score, scored, math.floor(drop_fraction * count + 1e-9))
            rules.append(f"drop the lowest {drop_fraction:g} of scored images by {by} (ties by image_id)")
            reason = f"in the lowest {drop_fraction:g} by {by}"
        elif min_quality is not None:
            low = "FALSE" if math.isnan(min_quality) else f"{score} < {double(min_quality)}"
            threshold = float(min_quality)
            rules.append(f"drop scored images with {by} < {min_quality:g}")
            reason = f"{by} < {min_quality:g}"
        else:
            low, reason = "FALSE", ""
        outlier = duplicate = small = "FALSE"
        joins = ""
        if identity_rules:
            images = quote(local_or_url(output, IDENTITY_IMAGES_FILE))
            # a near-duplicate goes only while the copy it points to stays: when an earlier rule dropped
            # the copy (a quality rule by another score, a tie at the cut), the duplicate is kept instead.
            # That join is materialised once, and only when duplicates are dropped.
            copies = (
                f"""LEFT JOIN (SELECT image_id, {scored} AND NOT ({low}) AS stays FROM scores) c
                        ON c.image_id = f.duplicate_of"""
                if drop_duplicates
                else ""
            )
            connection.execute(
                f"""CREATE TEMP {"TABLE" if drop_duplicates else "VIEW"} identity_flags AS
                    SELECT f.image_id, f.outlier, f.duplicate_of,
                           {"coalesce(c.stays, false)" if drop_duplicates else "false"} AS copy_stays
                    FROM read_parquet({images}) f {copies}"""
            )
            joins = " LEFT JOIN identity_flags USING (image_id)"
            if drop_outliers:
                outlier = "coalesce(outlier, false)"
                rules.append("drop identity outliers")
            if drop_duplicates:
                duplicate = "(duplicate_of IS NOT NULL AND copy_stays)"
                rules.append("drop near-duplicates but the best copy")
        survives = f"{scored} AND NOT ({low}) AND NOT ({outlier}) AND NOT ({duplicate})"
        if min_identity_images is not None:
            # counted over the whole table first: an identity's images may lie in any shard
            connection.execute(
                f"CREATE TEMP TABLE identity_left AS SELECT identity, count(*) FILTER (WHERE {survives}) "
                f"AS images_left FROM scores{joins} WHERE coalesce(identity, '') <> '' GROUP BY identity"
            )
            joins += " LEFT JOIN identity_left USING (identity)"
            small = f"coalesce(images_left < {int(min_identity_images)}, false)"
            rules.append(f"drop identities left with fewer than {min_identity_images} images")
        identity_reasons = "".join(
            f"WHEN {condition} THEN {text} "
            for condition, text in (
                (outlier, "'identity outlier'"),
                (duplicate, "'near-duplicate of ' || duplicate_of"),
                (
                    small,
                    f"'identity left with ' || images_left || "
                    f"{quote(f' images (fewer than {min_identity_images})')}",
                ),
            )
            if condition != "FALSE"  # the columns a rule reads are joined only when the rule is on
        )
        decisions = (
            f"SELECT image_id, source, "
            f"CASE WHEN isfinite({score}) THEN CAST({score} AS FLOAT) END AS quality, "
            f"CASE WHEN status <> {quote(Status.OK.value)} "
            f"THEN rtrim(status || ': ' || coalesce(error, ''), ': ') "
            f"WHEN NOT {scored} THEN {quote(f'no finite {by} score')} "
            f"WHEN {low} THEN {quote(reason)} "
            f"{identity_reasons}ELSE 'kept' END AS reason, "
            f"{survives} AND NOT ({small}) AS kept, {scored} AS scored, {scored} AND ({low}) AS low, "
            f"{scored} AND NOT ({low}) AND ({outlier}) AS outlier, "
            f"{scored} AND NOT ({low}) AND NOT ({outlier}) AND ({duplicate}) AS duplicate, "
            f"{survives} AND ({small}) AS small "
            f"FROM {{relation}}{joins} ORDER BY image_id"
        )
        counts = _write_lists(connection, output, decisions)
    selection = Selection(
        by=by,
        rule="; ".join(rules),
        threshold=threshold,
        kept=counts["kept"],
        dropped_low_quality=counts["low"],
        dropped_unscored=counts["rows"] - counts["scored"],
        output=output.full_url(CURATION),
        dropped_outliers=counts["outlier"],
        dropped_duplicates=counts["duplicate"],
        dropped_small_identities=counts["small"],
    )
    output.commit_bytes(f"{CURATION}/selection.json", json.dumps(asdict(selection), indent=1).encode())
    return selection
