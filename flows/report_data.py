"""What the report shows, computed before anything is drawn (`collect`): counts, failures, per-exit
scores, agreement between exits, thresholds, the images the galleries pick, identity statistics, the
evaluation written beside the table, and the summary (`report/summary.json`, the Prefect artifact).

`flows.report` renders it; nothing here draws or writes HTML.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import EVALUATION, LISTING_FILE, SCORES, RunRecord
from fiqa_curator.schemas.quality_table import exit_score_matrix
from fiqa_curator.schemas.status import Status

logger = logging.getLogger(__name__)
COLUMNS = [
    "image_id",
    "identity",
    "status",
    "error",
    "width",
    "height",
    "resized",
    "exit_depth",
    "exit_scores",
    "quality",
]
QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.3)
FAILURE_EXAMPLES = 5
GALLERY = 8
ATTENTION_IMAGES = 4
MIN_IMAGES_PER_IDENTITY = 2
BOTTOM_SHARE = 0.1  # the agreement section compares each exit's bottom 10% with the fused score's


@dataclass
class Agreement:
    spearman: np.ndarray  # (L + 1, L + 1) rank correlations of exits 1..L and the fused score
    bottom: int  # images in the bottom share
    overlap: list[tuple[str, float, float]]  # (exit, Spearman vs fused, share of the fused bottom it shares)


@dataclass
class Identities:
    count: int
    median_images: float
    max_images: int
    mostly_below: list[tuple[str, int, int]]  # (identity, images, below the threshold)
    too_few: list[tuple[str, int, int]]  # (identity, images, kept)


@dataclass
class AttentionGrid:
    """The quality token's attention over the patches at every exit, for a few shown images."""

    shown: list[tuple[str, float]]  # (image_id, quality)
    maps: np.ndarray  # (images, exits, grid, grid)
    seen: int  # pixels the patches cover (108 of 112 with 9-pixel patches)


@dataclass
class ReportData:
    """Everything the page shows, as numbers and ids."""

    rows: int
    counts: dict[str, int]  # rows by status, sorted by status
    failures: list[tuple[str, str, str]]  # (status, image_id, reason): a few examples of each failure
    run: RunRecord
    ok_ids: np.ndarray  # scored rows with a finite score
    quality: np.ndarray
    exits: np.ndarray  # (scored rows, L)
    pixels: np.ndarray  # decoded width x height of the scored rows
    resized: np.ndarray
    agreement: Agreement | None = None
    thresholds: list[tuple[str, float, int]] = field(default_factory=list)  # (quantile, threshold, dropped)
    threshold_quantile: float = 0.1
    threshold: float | None = None  # the galleries' and identities' threshold
    galleries: list[tuple[str, list[int]]] = field(
        default_factory=list
    )  # (title, indices into the scored rows)
    attention: list[int] = field(default_factory=list)  # indices of the scored rows the attention grid shows
    identities: Identities | None = None
    evaluation: dict[str, Any] | None = None  # OUTPUT/evaluation/result.json
    evaluation_images: dict[str, bytes] = field(default_factory=dict)
    attention_grid: AttentionGrid | None = None  # needs the faces: `attention_grid`

    @property
    def scored(self) -> int:
        return len(self.quality)

    def summary(self) -> dict[str, Any]:
        """The machine-readable summary: report/summary.json and the Prefect artifacts."""
        summary: dict[str, Any] = {"rows": self.rows, "counts": self.counts}
        if self.agreement is not None:
            summary["bottom_overlap"] = {name: share for name, _, share in self.agreement.overlap}
        if self.thresholds:
            summary["thresholds"] = {
                q: {"threshold": value, "dropped": dropped} for q, value, dropped in self.thresholds
            }
        if self.identities is not None:
            summary["identities"] = {
                "count": self.identities.count,
                "mostly_below": [row[0] for row in self.identities.mostly_below],
                "too_few_after_curation": [row[0] for row in self.identities.too_few],
            }
        if self.evaluation:
            advisor = self.evaluation.get("advisor")
            if advisor:
                chosen = advisor["recommended"]
                summary["advisor"] = {"exit_depth": chosen["exit_depth"], "option": chosen["option"]}
            methods = self.evaluation["methods"]
            first = next(iter(next(iter(methods.values()))))
            summary["evaluation"] = {
                "protocol": self.evaluation.get("protocol"),
                "best": min(methods, key=lambda name: methods[name][first]["pauc"]),
            }
        return summary


def load_table(output: Output) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows without exit scores, (N, L) exit scores with NaN rows where unscored). Only the columns the page
    shows are read (never embeddings), and the exit scores stay in numpy, not in Python lists."""
    table = pq.read_table(output.path(SCORES), columns=COLUMNS, filesystem=output.fs)
    return table.drop_columns(["exit_scores"]).to_pandas(), exit_score_matrix(table)


def read_listing(output: Output) -> dict[str, tuple[str, int, int]]:
    """image_id -> (url, offset, length) of every planned item: where its bytes are."""
    raw = output.read_bytes(LISTING_FILE)
    if not raw:
        return {}
    table = pq.read_table(io.BytesIO(raw), columns=["image_id", "url", "offset", "length"])
    return {row["image_id"]: (row["url"], row["offset"], row["length"]) for row in table.to_pylist()}


def _agreement(exits: np.ndarray, quality: np.ndarray) -> Agreement:
    depth = exits.shape[1]
    ranks = pd.DataFrame(np.column_stack([exits, quality])).rank()
    spearman = ranks.corr().to_numpy()
    bottom = max(1, round(BOTTOM_SHARE * len(quality)))
    fused_bottom = set(np.argsort(quality, kind="stable")[:bottom])
    overlap = [
        (
            f"exit {k + 1}",
            float(spearman[k, depth]),
            len(fused_bottom & set(np.argsort(exits[:, k], kind="stable")[:bottom])) / bottom,
        )
        for k in range(depth)
    ]
    return Agreement(spearman, bottom, overlap)


def _identities(ok: pd.DataFrame, quality: np.ndarray, threshold: float) -> Identities | None:
    known = ok["identity"].notna().to_numpy()
    if not known.any():
        return None
    scored = ok[known].assign(below=quality[known] < threshold)
    per = scored.groupby("identity").agg(images=("image_id", "size"), below=("below", "sum"))
    per["kept"] = per["images"] - per["below"]
    mostly_below = per[per["below"] > per["images"] / 2].sort_index()
    too_few = per[per["kept"] < MIN_IMAGES_PER_IDENTITY].sort_index()
    return Identities(
        len(per),
        float(per["images"].median()),
        int(per["images"].max()),
        [(str(i), int(n), int(b)) for i, n, b in mostly_below[["images", "below"]].itertuples()],
        [(str(i), int(n), int(k)) for i, n, k in too_few[["images", "kept"]].itertuples()],
    )


def _evaluation(output: Output) -> tuple[dict[str, Any] | None, dict[str, bytes]]:
    """OUTPUT/evaluation/ (written by `fiqa evaluate --output OUTPUT/evaluation`): its result and plots."""
    raw = output.read_bytes(f"{EVALUATION}/result.json")
    result = json.loads(raw) if raw else None
    if not result or not result.get("methods"):
        return None, {}
    images = {
        name: image
        for name in ("edc.png", "pauc_vs_gflops.png")
        if (image := output.read_bytes(f"{EVALUATION}/{name}"))
    }
    return result, images


def collect(output: Output, *, threshold_quantile: float = 0.1) -> ReportData:
    """Read what the page needs from OUTPUT and compute every figure's numbers."""
    output.require_table()
    frame, all_exits = load_table(output)
    run = output.read_run_record() or RunRecord()
    counts = frame["status"].value_counts().sort_index()
    failures = [
        (str(status), str(row["image_id"]), row["error"])
        for status, group in frame[frame["status"] != Status.OK].groupby("status")
        for _, row in group.head(FAILURE_EXAMPLES).iterrows()
    ]
    # scored rows with a finite score (a NaN from a broken checkpoint must not break every plot)
    ok_mask = (frame["status"] == Status.OK).to_numpy() & np.isfinite(
        frame["quality"].to_numpy(dtype=np.float64)
    )
    ok = frame[ok_mask]
    quality = ok["quality"].to_numpy(dtype=np.float64)
    data = ReportData(
        rows=len(frame),
        counts={str(k): int(v) for k, v in counts.items()},
        failures=failures,
        run=run,
        ok_ids=ok["image_id"].to_numpy(dtype=object),
        quality=quality,
        exits=all_exits[ok_mask],
        pixels=(ok["width"].astype(float) * ok["height"].astype(float)).to_numpy(),
        resized=ok["resized"].fillna(False).to_numpy(dtype=bool),
        threshold_quantile=threshold_quantile,
    )
    data.evaluation, data.evaluation_images = _evaluation(output)
    if not len(ok):
        return data
    data.agreement = _agreement(data.exits, quality)
    for q in QUANTILES:
        value = float(np.quantile(quality, q))
        data.thresholds.append((f"{q:g}", value, int(np.sum(quality < value))))
    data.threshold = float(np.quantile(quality, threshold_quantile))
    order = np.lexsort((data.ok_ids, quality))  # by quality, ties by image_id: the same pages every run
    near = np.argsort(np.abs(quality - data.threshold), kind="stable")[:GALLERY]
    data.galleries = [
        ("Lowest quality", list(order[:GALLERY])),
        ("Highest quality", list(order[::-1][:GALLERY])),
        (f"Around the {threshold_quantile:g} quantile threshold ({data.threshold:.4f})", list(near)),
    ]
    data.attention = [*order[: ATTENTION_IMAGES // 2], *order[::-1][: ATTENTION_IMAGES // 2]]
    data.identities = _identities(ok, quality, data.threshold)
    return data


def shown_ids(data: ReportData) -> list[str]:
    """The image ids whose faces the page shows (galleries, attention), each once, in order of appearance."""
    seen: dict[str, None] = {}
    for _, indices in data.galleries:
        seen.update((str(data.ok_ids[i]), None) for i in indices)
    seen.update((str(data.ok_ids[i]), None) for i in data.attention)
    return list(seen)


def faces_of(
    output: Output, image_ids: list[str], run: RunRecord, storage_options: Mapping[str, Any] | None
) -> dict[str, np.ndarray | None]:
    """The face each image's row was scored on, read again from its source and cropped the way the run
    did (`workers.reading.decode_rows`, with the run's input size, pixel limit and alignment); None for an
    image that can no longer be read (moved or deleted since) or no longer gives that face."""
    from fiqa_curator.schemas.batch import item_of
    from fiqa_curator.workers.io import read_range
    from fiqa_curator.workers.reading import decode_rows

    listing = read_listing(output)
    config = run.config
    size = int((run.model_config_dict or {}).get("img_size", 112))
    align = config.get("align")
    faces: dict[str, np.ndarray | None] = {}
    unreadable: list[str] = []
    for image_id in image_ids:
        item_id, face_index = item_of(image_id, align)
        faces[image_id] = None
        if item_id not in listing:
            continue
        try:
            data = read_range(*listing[item_id], storage_options, attempts=2)
        except Exception as error:  # any store's error (moved, deleted, no credentials here): "no preview"
            unreadable.append(f"{image_id}: {type(error).__name__}: {error}")
            continue
        kwargs = {"max_pixels": config["max_pixels"]} if config.get("max_pixels") else {}
        rows = [row for row in decode_rows(data, size, align=align, **kwargs) if row.pixels is not None]
        if align == "all":
            rows = [row for row in rows if row.face_index == face_index]
        faces[image_id] = rows[0].pixels if rows else None
    if unreadable:  # said once, not per image: the page shows "no preview" for each
        logger.warning(
            "%d image(s) could not be read again for the report, e.g. %s", len(unreadable), unreadable[0]
        )
    return faces


def attention_grid(
    data: ReportData, faces: Mapping[str, np.ndarray | None], storage_options: Mapping[str, Any] | None
) -> AttentionGrid | None:
    """The attention maps of the lowest and highest images at every exit (token and full models only);
    None when the model has no quality token or its checkpoint cannot be read from here any more."""
    from fiqa_curator.workers.checkpoint import load_model
    from fiqa_curator.workers.config import ViTFIQAConfig
    from fiqa_curator.workers.preprocess import normalize

    config, checkpoint = data.run.model_config_dict, data.run.checkpoint
    if not config or not checkpoint or config.get("mode") == "crfiqa":
        return None
    shown = [(str(data.ok_ids[i]), float(data.quality[i])) for i in data.attention]
    shown = [(image_id, score) for image_id, score in shown if faces.get(image_id) is not None]
    if not shown:
        return None
    try:
        loaded = load_model(checkpoint, ViTFIQAConfig.from_dict(config), storage_options=storage_options)
    except UserError as error:  # moved, not readable from here, or another architecture: no such figure
        logger.warning("no attention figure: %s", error)
        return None
    depth = int(data.run.config.get("exit_depth", loaded.config.depth))
    stack = np.stack([faces[image_id] for image_id, _ in shown])
    maps = loaded.model.quality_token_attention(normalize(stack), depth).numpy()
    return AttentionGrid(shown, maps, loaded.config.grid_size * loaded.config.patch_size)
