"""The embedded default job (`fiqa demo`, the README's first command): the sample dataset scored through
the real pipeline by the bundled demo model.

1. builds the sample dataset under OUTPUT/data if missing (`demo_kit.build`: the 15 faces held out from
   the demo model's training, clean and degraded, with dlib's utility target; about a minute);
2. scores its manifest with Prefect + Ray into OUTPUT/quality (Parquet quality table, run record, report);
3. scores the unaligned photographs of OUTPUT/data/raw with `--align --all-faces` into OUTPUT/raw-quality
   (detection, alignment, a photo with two faces, photos with no face, a broken file);
4. evaluates the scores against dlib's face recogniser (EDC, `erc` protocol: every exit, F/FW fusions, the
   exit-depth advisor) into OUTPUT/quality/evaluation, checks every identity against its quality-weighted
   centre with dlib's embeddings (`fiqa identities`: outliers, near-duplicates, merge candidates) into
   OUTPUT/quality/curation, and adds both to the report;
5. summarises how well the scores separate clean from heavily degraded faces.

Offline: faces and models ship inside installed packages; nothing is downloaded.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from fiqa_curator.flows.options import ScoreOptions
from fiqa_curator.flows.score import RunSummary, score_flow
from fiqa_curator.schemas.layout import EVALUATION, IDENTITY_IMAGES_FILE, SCORES
from fiqa_curator.schemas.status import Status

NOTICE = (
    "fiqa demo: sample faces from installed packages (held out from the demo model's training), degraded at "
    "5 severities, scored by the bundled DEMO model (trained here on CPU in minutes: a demonstration, not "
    "for production; workers/assets/demo/MODEL_CARD.md)."
)
HEAVY = 5  # the highest severity


@dataclass
class DemoResult:
    output: Path
    rows: list[dict[str, Any]]  # quality table rows joined with the manifest (degradation, severity, utility)
    summary: RunSummary
    raw_rows: list[dict[str, Any]] = field(default_factory=list)
    raw_summary: RunSummary | None = None
    separation: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    identities: Any = None  # flows.identities.IdentitySummary
    outliers_by_severity: dict[int, tuple[int, int]] = field(default_factory=dict)  # severity: (outliers, of)


def separation(rows: list[dict[str, Any]], column: str = "quality") -> dict[str, Any]:
    """How well `column` separates clean from heavily degraded images, and its agreement with the utility."""
    from scipy.stats import spearmanr

    ok = [row for row in rows if row["status"] == Status.OK]
    clean = np.array([row[column] for row in ok if row["severity"] == 0])
    heavy = np.array([row[column] for row in ok if row["severity"] == HEAVY])
    by_severity = {}
    for severity in sorted({row["severity"] for row in ok}):
        by_severity[severity] = float(np.median([row[column] for row in ok if row["severity"] == severity]))
    # probability that a clean image outscores a heavily degraded one (ties count half): the ROC AUC
    above = (
        (clean[:, None] > heavy[None, :]).mean() + 0.5 * (clean[:, None] == heavy[None, :]).mean()
        if len(clean) and len(heavy)
        else float("nan")
    )
    return {
        "clean_median": float(np.median(clean)) if len(clean) else float("nan"),
        "heavy_median": float(np.median(heavy)) if len(heavy) else float("nan"),
        "clean_above_heavy": float(above),
        "median_by_severity": by_severity,
        "spearman_utility": float(spearmanr([r[column] for r in ok], [r["utility"] for r in ok]).statistic),
        "images": len(ok),
    }


def median_by_degradation(rows: list[dict[str, Any]]) -> tuple[list[int], dict[str, list[float | None]]]:
    """(severities, degradation -> median quality of its scored images at each severity; None where it has
    none). Severity 0 is the clean images, the same for every degradation."""
    ok = [row for row in rows if row["status"] == Status.OK]
    severities = sorted({row["severity"] for row in rows})
    clean = [row["quality"] for row in ok if row["severity"] == 0]
    medians: dict[str, list[float | None]] = {}
    for kind in sorted({row["degradation"] for row in rows} - {"clean"}):
        cells: list[float | None] = []
        for severity in severities:
            values = (
                clean
                if severity == 0
                else [
                    row["quality"] for row in ok if row["degradation"] == kind and row["severity"] == severity
                ]
            )
            cells.append(float(np.median(values)) if values else None)
        medians[kind] = cells
    return severities, medians


def _manifest(path: Path) -> dict[str, dict[str, Any]]:
    with open(path, newline="") as handle:
        return {row["image_id"]: row for row in csv.DictReader(handle)}


def run_demo(
    output: Path,
    *,
    exit_depth: int | None = None,
    fusion: str = "fw",
    faces: int | None = None,
    raw: bool = True,
    evaluate: bool = True,
    on_rows: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Build the sample data if missing, then score it (and the raw photographs) through the real pipeline.

    A rerun finds the same listing and configuration and resumes (nothing to recompute); a rerun with
    other options replaces the previous results."""
    from fiqa_curator.demo_kit.build import MANIFEST, build_sample_set
    from fiqa_curator.flows.prefect_server import start_prefect_api_in_background

    prefect_api = (
        start_prefect_api_in_background()
    )  # its first start (a new database) overlaps the data build
    data = output / "data"
    manifest = data / MANIFEST
    if not manifest.is_file():
        build_sample_set(data, split="test", max_faces=faces, log=log)
    prefect_api.result()  # a server that could not start fails here, with its one-line reason
    options = ScoreOptions.make(
        input=str(manifest),
        output=str(output / "quality"),
        exit_depth=exit_depth,
        fusion=fusion,
        shard_size=250,
        overwrite=True,
    )
    summary = score_flow(options, on_rows=on_rows)
    known = _manifest(manifest)
    rows = []
    for row in pq.read_table(output / "quality" / SCORES).to_pylist():
        meta = known[row["image_id"]]
        rows.append(
            {
                **row,
                "degradation": meta["degradation"],
                "severity": int(meta["severity"]),
                "utility": float(meta["utility"]),
                "face": meta["face"],
            }
        )
    result = DemoResult(output=output, rows=rows, summary=summary, separation=separation(rows))
    if evaluate:
        from fiqa_curator.flows.evaluate import run_evaluation
        from fiqa_curator.flows.report import write_report

        quality = str(output / "quality")
        result.evaluation, _, _ = run_evaluation(
            quality,
            str(data / "pairs.parquet"),
            embeddings=str(data / "fr_embeddings.parquet"),
            protocol="erc",
            output=str(output / "quality" / EVALUATION),
        )
        from fiqa_curator.flows.identities import find_identities

        result.identities = find_identities(quality, embeddings=str(data / "fr_embeddings.parquet"))
        flagged = pq.read_table(output / "quality" / IDENTITY_IMAGES_FILE, columns=["image_id", "outlier"])
        outlier = dict(zip(*flagged.to_pydict().values(), strict=True))
        for row in rows:
            severity = row["severity"]
            found, total = result.outliers_by_severity.get(severity, (0, 0))
            result.outliers_by_severity[severity] = (found + bool(outlier.get(row["image_id"])), total + 1)
        write_report(quality)  # again, now with the evaluation and identity sections
    if raw and (data / "raw").is_dir():
        raw_options = ScoreOptions.make(
            input=str(data / "raw"),
            output=str(output / "raw-quality"),
            exit_depth=exit_depth,
            fusion=fusion,
            align="all",
            overwrite=True,
        )
        result.raw_summary = score_flow(raw_options, on_rows=on_rows)
        result.raw_rows = pq.read_table(output / "raw-quality" / SCORES).to_pylist()
    return result
