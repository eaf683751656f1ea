"""What the report shows, computed before anything is drawn (`collect`): counts, failures, per-exit
score histograms, agreement between exits, thresholds, the images the galleries pick, identity statistics,
the identity curation `fiqa identities` wrote (when it describes this very table), the evaluation written
beside the table, and the summary (`report/summary.json`, the Prefect artifact).

Every figure is computed by DuckDB over the table's Parquet files (`flows.table_sql`), in memory that does
not grow with the table: counts, histograms and identity statistics are aggregates; thresholds are exact
order statistics (equal to numpy's quantiles); galleries are top-N queries; the agreement between exits
and the size plot use a fixed sample of at most SAMPLE_ROWS scored rows (the rows with the smallest hash
of their image_id: the same rows every run; every row when there are fewer). Nothing reads the whole
table into Python.

`flows.report` renders it; nothing here draws or writes HTML.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from fiqa_curator.flows.configuration import AttentionMaps
from fiqa_curator.flows.storage import Output
from fiqa_curator.flows.table_sql import (
    connect,
    double,
    local_or_url,
    quality_table,
    quantiles,
    quote,
    scalar,
)
from fiqa_curator.schemas.layout import (
    EVALUATION,
    IDENTITIES_FILE,
    IDENTITY_IMAGES_FILE,
    IDENTITY_SUMMARY_FILE,
    LISTING_FILE,
    RunRecord,
)
from fiqa_curator.schemas.quality_table import exit_score_matrix
from fiqa_curator.schemas.status import Status
from fiqa_curator.workers.config import ViTFIQAConfig

logger = logging.getLogger(__name__)
QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.3)
FAILURE_EXAMPLES = 5
GALLERY = 8
ATTENTION_IMAGES = 4
MIN_IMAGES_PER_IDENTITY = 2
BOTTOM_SHARE = 0.1  # the agreement section compares each exit's bottom 10% with the fused score's
SAMPLE_ROWS = 100_000  # rows behind the agreement figures and the size plot
IDENTITY_LIST = 100  # identities listed per list (the page and the summary); the counts are complete
CURATED_IDENTITIES = 6  # identities (and merge pairs) the identity-curation galleries show
CURATED_IMAGES = 4  # images per side of each
QUALITY_BINS, EXIT_BINS = 50, 30

# Scored rows: status ok and a finite fused score (a NaN from a broken checkpoint must not break a plot).
SCORED_VIEW = f"""CREATE TEMP VIEW scored AS
SELECT image_id, identity, CAST(quality AS DOUBLE) AS q, exit_depth, exit_scores, width, height, resized
FROM scores WHERE status = {quote(Status.OK.value)} AND coalesce(isfinite(quality), false)"""


@dataclass
class Histogram:
    edges: np.ndarray  # bins + 1 edges, as numpy's histogram makes them
    counts: np.ndarray


@dataclass
class Sample:
    """At most SAMPLE_ROWS scored rows, in image_id order."""

    ids: np.ndarray
    quality: np.ndarray
    exits: np.ndarray  # (rows, L)
    pixels: np.ndarray  # decoded width x height
    resized: np.ndarray


@dataclass
class Agreement:
    spearman: np.ndarray  # (L + 1, L + 1) rank correlations of exits 1..L and the fused score
    bottom: int  # images in the bottom share (of the sample)
    overlap: list[tuple[str, float, float]]  # (exit, Spearman vs fused, share of the fused bottom it shares)
    sampled: int  # rows it was computed on


@dataclass
class Identities:
    count: int
    median_images: float
    max_images: int
    mostly_below: list[tuple[str, int, int]]  # (identity, images, below the threshold), first by name
    too_few: list[tuple[str, int, int]]  # (identity, images, kept), first IDENTITY_LIST by name
    mostly_below_count: int = 0
    too_few_count: int = 0


Judged = tuple[str, float | None, float | None]  # (image_id, quality, similarity to its identity's centre)


@dataclass
class IdentityCuration:
    """What `fiqa identities` found (OUTPUT/curation/), for the report: its figures, the identities with
    the largest share of outliers (the images nearest their centre and farthest from it), and the merge
    candidates (each side's best images)."""

    summary: dict[str, Any]  # identities.json
    worst: list[tuple[str, int, int, list[Judged], list[Judged]]]  # (identity, usable, outliers, near, far)
    merges: list[tuple[str, str, float, list[Judged], list[Judged]]]  # (a, b, similarity, a's, b's)


@dataclass
class AttentionGrid:
    """The quality token's attention over the patches at every exit, for a few shown images: asked of the
    driver's model process (`flows.configuration.AttentionMaps`), which loads the model while the report
    draws its other sections."""

    shown: list[tuple[str, float]]  # (image_id, quality)
    asked: AttentionMaps
    seen: int  # pixels the patches cover (108 of 112 with 9-pixel patches)

    def maps(self) -> np.ndarray | None:
        """(images, exits, grid, grid), waited for; None, with a warning, when the model process could not
        compute them (the checkpoint moved or is not readable from here any more, another architecture)."""
        try:
            return self.asked.result()
        except Exception as error:  # a figure of four images must not cost the report
            logger.warning("no attention figure: %s: %s", type(error).__name__, error)
            return None


Shown = tuple[str, float]  # (image_id, quality) of an image a gallery or the attention figure shows


@dataclass
class ReportData:
    """Everything the page shows, as numbers and ids."""

    rows: int
    counts: dict[str, int]  # rows by status, sorted by status
    failures: list[tuple[str, str, str]]  # (status, image_id, reason): a few examples of each failure
    run: RunRecord
    scored: int = 0  # rows with status ok and a finite score
    depth: int = 0  # exits per scored row
    quality_histogram: Histogram | None = None
    exit_histograms: list[Histogram] = field(default_factory=list)
    sample: Sample | None = None
    sizes: list[tuple[str, int, float]] = field(default_factory=list)  # (resized or not, images, mean q)
    pixel_range: tuple[float, float] | None = None  # smallest and largest decoded image (pixels)
    agreement: Agreement | None = None
    thresholds: list[tuple[str, float, int]] = field(default_factory=list)  # (quantile, threshold, dropped)
    threshold_quantile: float = 0.1
    threshold: float | None = None  # the galleries' and identities' threshold
    threshold_dropped: int = 0
    galleries: list[tuple[str, list[Shown]]] = field(default_factory=list)
    attention: list[Shown] = field(default_factory=list)  # the images the attention grid shows
    identities: Identities | None = None
    curation: IdentityCuration | None = None  # OUTPUT/curation/ from `fiqa identities`
    evaluation: dict[str, Any] | None = None  # OUTPUT/evaluation/result.json
    evaluation_images: dict[str, bytes] = field(default_factory=dict)
    attention_grid: AttentionGrid | None = None  # needs the faces: `attention_grid`

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
                "mostly_below_count": self.identities.mostly_below_count,
                "too_few_after_curation": [row[0] for row in self.identities.too_few],
                "too_few_after_curation_count": self.identities.too_few_count,
            }
        if self.curation is not None:
            summary["identity_curation"] = {
                key: self.curation.summary[key]
                for key in ("identities", "outliers", "duplicates", "kept", "merge_candidates")
            }
        if self.evaluation:
            advisor = self.advisor()
            if advisor:
                summary["advisor"] = advisor
            methods = self.evaluation["methods"]
            first = next(iter(next(iter(methods.values()))))
            summary["evaluation"] = {
                "protocol": self.evaluation.get("protocol"),
                "best": min(methods, key=lambda name: methods[name][first]["pauc"]),
            }
        return summary

    def advisor(self) -> dict[str, Any] | None:
        """The evaluation advisor's recommended exit depth and option, when an evaluation exists."""
        advisor = (self.evaluation or {}).get("advisor")
        if not advisor:
            return None
        chosen = advisor["recommended"]
        return {"exit_depth": chosen["exit_depth"], "option": chosen["option"]}


def _histograms(
    connection: duckdb.DuckDBPyConnection, relation: str, values: list[str], bins: int
) -> list[Histogram | None]:
    """numpy's histogram (edges from the finite values' min and max) of each DOUBLE expression in
    `values` over `relation`, in two scans whatever their number: the ranges, then the counts of every
    expression at once (GROUPING SETS). None for an expression without a finite value."""
    finite = [f"CASE WHEN isfinite({value}) THEN {value} END" for value in values]
    bounds = connection.execute(
        "SELECT " + ", ".join(f"min({v}), max({v})" for v in finite) + f" FROM {relation}"
    ).fetchone()
    ranges = []
    for low, high in zip(bounds[::2], bounds[1::2], strict=True):
        if low is not None and low == high:  # numpy's convention for a single value
            low, high = low - 0.5, high + 0.5
        ranges.append((low, high))
    present = [i for i, (low, _) in enumerate(ranges) if low is not None]
    histograms: list[Histogram | None] = [None] * len(values)
    if not present:
        return histograms
    edges = {i: np.linspace(*ranges[i], bins + 1) for i in present}
    # numpy's own steps (numpy/lib/_histograms_impl.py): the index from the scaled offset, truncated, the
    # right edge in the last bin, then one step down or up where the value falls outside its bin's edges
    # (~1 ulp); every constant an exact DOUBLE (a bare literal would be a DECIMAL)
    start = [
        f"least({bins - 1}, CAST(trunc(({finite[i]} - {double(ranges[i][0])}) / "
        f"({double(ranges[i][1])} - {double(ranges[i][0])}) * {bins}) AS BIGINT)) AS i{i}, "
        f"{finite[i]} AS v{i}"
        for i in present
    ]
    lists = {i: f"CAST({quote(json.dumps([repr(float(e)) for e in edges[i]]))} AS DOUBLE[])" for i in present}
    lower = [f"i{i} - CASE WHEN v{i} < {lists[i]}[i{i} + 1] THEN 1 ELSE 0 END AS j{i}, v{i}" for i in present]
    upper = [
        f"j{i} + CASE WHEN j{i} <> {bins - 1} AND v{i} >= {lists[i]}[j{i} + 2] THEN 1 ELSE 0 END AS b{i}"
        for i in present
    ]
    names = [f"b{i}" for i in present]
    rows = connection.execute(
        f"SELECT {', '.join(f'grouping({n})' for n in names)}, {', '.join(names)}, count(*) "
        f"FROM (SELECT {', '.join(upper)} FROM (SELECT {', '.join(lower)} FROM "
        f"(SELECT {', '.join(start)} FROM {relation}))) "
        f"GROUP BY GROUPING SETS ({', '.join(f'({n})' for n in names)})"
    ).fetchall()
    counts = {i: np.zeros(bins, dtype=np.int64) for i in present}
    for row in rows:
        flags, buckets, n = row[: len(names)], row[len(names) : 2 * len(names)], row[-1]
        which = flags.index(0)  # the grouping set this row belongs to
        if buckets[which] is not None:  # not the non-finite values' group
            counts[present[which]][int(buckets[which])] = n
    for i in present:
        histograms[i] = Histogram(edges[i], counts[i])
    return histograms


def _sample(connection: duckdb.DuckDBPyConnection, scored: int) -> Sample:
    """The SAMPLE_ROWS scored rows with the smallest hash of their image_id (all rows when fewer). A plain
    `ORDER BY hash LIMIT n` over the whole table costs DuckDB ~65 bytes a row (650 MB at 10M rows), so
    the candidates are first cut by a hash range holding ~1.2x the sample, widened until it holds enough."""
    condition, share = "TRUE", 1.2 * SAMPLE_ROWS / max(scored, 1)
    while scored > SAMPLE_ROWS and share < 1:
        cutoff = min(2**64 - 1, int(share * 2**64))
        condition = f"hash(image_id) < CAST({cutoff} AS UBIGINT)"
        if scalar(connection, f"SELECT count(*) FROM scored WHERE {condition}") >= SAMPLE_ROWS:
            break
        condition, share = "TRUE", share * 2
    connection.execute(
        f"""CREATE TEMP TABLE chosen AS SELECT image_id FROM scored WHERE {condition}
            ORDER BY hash(image_id), image_id LIMIT {SAMPLE_ROWS}"""
    )
    table = connection.sql(
        """SELECT image_id, q, exit_depth, exit_scores, CAST(width AS DOUBLE) * height AS pixels,
                  coalesce(resized, false) AS resized
           FROM scored SEMI JOIN chosen USING (image_id) ORDER BY image_id"""
    ).to_arrow_table()
    return Sample(
        ids=table.column("image_id").to_numpy(zero_copy_only=False),
        quality=table.column("q").to_numpy(),
        exits=exit_score_matrix(table),  # NaN rows for a null list, as before
        pixels=table.column("pixels").to_numpy(zero_copy_only=False).astype(np.float64),
        resized=table.column("resized").to_numpy(zero_copy_only=False).astype(bool),
    )


def _agreement(sample: Sample) -> Agreement:
    exits, quality = sample.exits, sample.quality
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
    return Agreement(spearman, bottom, overlap, len(quality))


def _identities(connection: duckdb.DuckDBPyConnection, threshold: float) -> Identities | None:
    connection.execute(
        f"""CREATE TEMP TABLE per_identity AS
            SELECT identity, count(*) AS images, count(*) FILTER (WHERE q < {double(threshold)}) AS below
            FROM scored WHERE identity IS NOT NULL GROUP BY identity"""
    )
    count, median, largest = connection.execute(
        "SELECT count(*), median(images), max(images) FROM per_identity"
    ).fetchone()
    if not count:
        return None

    def listed(condition: str, second: str) -> tuple[list[tuple[str, int, int]], int]:
        rows = connection.execute(
            f"SELECT identity, images, {second} FROM per_identity WHERE {condition} "
            f"ORDER BY identity LIMIT {IDENTITY_LIST}"
        ).fetchall()
        total = scalar(connection, f"SELECT count(*) FROM per_identity WHERE {condition}")
        return [(str(i), int(n), int(m)) for i, n, m in rows], int(total)

    mostly_below, mostly_below_count = listed("below > images / 2", "below")
    too_few, too_few_count = listed(f"images - below < {MIN_IMAGES_PER_IDENTITY}", "images - below")
    return Identities(
        int(count), float(median), int(largest), mostly_below, too_few, mostly_below_count, too_few_count
    )


def _identity_curation(output: Output, connection: duckdb.DuckDBPyConnection) -> IdentityCuration | None:
    """OUTPUT/curation/ from `fiqa identities`, when it describes the table as it is now (a rescored table
    makes it stale: it is then left out, with a warning)."""
    raw = output.read_bytes(IDENTITY_SUMMARY_FILE)
    if raw is None:
        return None
    summary = json.loads(raw)
    if summary.get("table") != output.table_fingerprint():
        logger.warning("the identity results in %s are of an earlier table: not in the report", output.url)
        return None
    images = f"read_parquet({quote(local_or_url(output, IDENTITY_IMAGES_FILE))})"
    people = f"read_parquet({quote(local_or_url(output, IDENTITIES_FILE))})"
    worst = connection.execute(
        f"""SELECT identity, usable, outliers FROM {people} WHERE usable >= 2 AND outliers > 0
            ORDER BY outliers / usable DESC, outliers DESC, identity LIMIT {CURATED_IDENTITIES}"""
    ).fetchall()
    pairs = connection.execute(
        f"""SELECT least(identity, nearest_identity) AS a, greatest(identity, nearest_identity) AS b,
                   max(nearest_similarity) AS similarity FROM {people} WHERE merge_candidate
            GROUP BY a, b ORDER BY similarity DESC, a, b LIMIT {CURATED_IDENTITIES}"""
    ).fetchall()
    wanted = sorted({name for name, _, _ in worst} | {name for a, b, _ in pairs for name in (a, b)})
    shown: dict[tuple[str, str], list[Judged]] = {}
    if wanted:
        names = ", ".join(quote(name) for name in wanted)
        for side, order, condition in (
            ("near", "similarity DESC", "similarity IS NOT NULL"),
            ("far", "similarity ASC", "similarity IS NOT NULL"),
            ("best", "quality DESC", "NOT outlier AND quality IS NOT NULL"),
        ):
            rows = connection.execute(
                f"""SELECT identity, image_id, quality, similarity FROM {images}
                    WHERE identity IN ({names}) AND {condition}
                    QUALIFY row_number() OVER (PARTITION BY identity ORDER BY {order}, image_id)
                        <= {CURATED_IMAGES}
                    ORDER BY identity, {order}, image_id"""
            ).fetchall()
            for identity, image_id, quality, similarity in rows:
                shown.setdefault((side, identity), []).append((str(image_id), quality, similarity))
    return IdentityCuration(
        summary=summary,
        worst=[
            (str(n), int(u), int(o), shown.get(("near", n), []), shown.get(("far", n), []))
            for n, u, o in worst
        ],
        merges=[
            (str(a), str(b), float(sim), shown.get(("best", a), []), shown.get(("best", b), []))
            for a, b, sim in pairs
        ],
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


def _shown(connection: duckdb.DuckDBPyConnection, order: str, limit: int) -> list[Shown]:
    rows = connection.execute(f"SELECT image_id, q FROM scored ORDER BY {order} LIMIT {limit}").fetchall()
    return [(str(image_id), float(q)) for image_id, q in rows]


def collect(
    output: Output, *, threshold_quantile: float = 0.1, memory_limit: str | None = None
) -> ReportData:
    """Read what the page needs from OUTPUT and compute every figure's numbers."""
    with quality_table(output, memory_limit=memory_limit) as connection:
        connection.execute(SCORED_VIEW)
        by_status = "SELECT status, count(*) FROM scores GROUP BY status ORDER BY status"
        counts = dict(connection.execute(by_status).fetchall())
        failures = connection.execute(
            f"""SELECT status, image_id, coalesce(error, '') FROM scores
                WHERE status <> {quote(Status.OK.value)}
                QUALIFY row_number() OVER (PARTITION BY status ORDER BY image_id) <= {FAILURE_EXAMPLES}
                ORDER BY status, image_id"""
        ).fetchall()
        data = ReportData(
            rows=sum(counts.values()),
            counts={str(k): int(v) for k, v in counts.items()},
            failures=[(str(s), str(i), str(e)) for s, i, e in failures],
            run=output.read_run_record() or RunRecord(),
            threshold_quantile=threshold_quantile,
        )
        scored, depth = connection.execute("SELECT count(*), max(exit_depth) FROM scored").fetchone()
        data.scored, data.depth = int(scored), int(depth or 0)
        data.evaluation, data.evaluation_images = _evaluation(output)
        data.curation = _identity_curation(output, connection)
        if not data.scored:
            return data
        _figures(connection, data)
    return data


def _figures(connection: duckdb.DuckDBPyConnection, data: ReportData) -> None:
    """The figures over the scored rows (there is at least one)."""
    data.quality_histogram = _histograms(connection, "scored", ["q"], QUALITY_BINS)[0]
    exits = [f"CAST(exit_scores[{k}] AS DOUBLE)" for k in range(1, data.depth + 1)]
    data.exit_histograms = _histograms(connection, "scored", exits, EXIT_BINS) if exits else []
    data.sample = _sample(connection, data.scored)
    data.agreement = _agreement(data.sample)
    groups = connection.execute(
        "SELECT coalesce(resized, false) AS r, count(*), avg(q), min(CAST(width AS DOUBLE) * height), "
        "max(CAST(width AS DOUBLE) * height) FROM scored GROUP BY r ORDER BY r DESC"
    ).fetchall()
    data.sizes = [("resized" if r else "not resized", int(n), float(mean)) for r, n, mean, _, _ in groups]
    smallest = [group[3] for group in groups if group[3] is not None]
    largest = [group[4] for group in groups if group[4] is not None]
    data.pixel_range = (min(smallest), max(largest)) if smallest else None  # None: no decoded size known
    levels = [*QUANTILES, data.threshold_quantile]
    values = quantiles(connection, "scored", "q", levels, data.scored)
    dropped = connection.execute(
        "SELECT "
        + ", ".join(f"count(*) FILTER (WHERE q < {double(value)})" for value in values)
        + " FROM scored"
    ).fetchone()
    data.thresholds = [(f"{q:g}", v, int(n)) for q, v, n in zip(QUANTILES, values, dropped, strict=False)]
    data.threshold, data.threshold_dropped = values[-1], int(dropped[-1])
    lowest = _shown(connection, "q, image_id", GALLERY)
    highest = _shown(connection, "q DESC, image_id DESC", GALLERY)
    near = _shown(connection, f"abs(q - {double(data.threshold)}), image_id", GALLERY)
    data.galleries = [
        ("Lowest quality", lowest),
        ("Highest quality", highest),
        (f"Around the {data.threshold_quantile:g} quantile threshold ({data.threshold:.4f})", near),
    ]
    data.attention = [*lowest[: ATTENTION_IMAGES // 2], *highest[: ATTENTION_IMAGES // 2]]
    data.identities = _identities(connection, data.threshold)


def shown_ids(data: ReportData) -> list[str]:
    """The image ids whose faces the page shows (galleries, attention), each once, in order of appearance."""
    seen: dict[str, None] = {}
    for _, shown in data.galleries:
        seen.update((image_id, None) for image_id, _ in shown)
    seen.update((image_id, None) for image_id, _ in data.attention)
    if data.curation is not None:
        for _, _, _, near, far in data.curation.worst:
            seen.update((image_id, None) for image_id, _, _ in [*near, *far])
        for _, _, _, first, second in data.curation.merges:
            seen.update((image_id, None) for image_id, _, _ in [*first, *second])
    return list(seen)


def read_listing(output: Output, image_ids: list[str]) -> dict[str, tuple[str, int, int]]:
    """image_id -> (url, offset, length) of the given planned items: where their bytes are. Only those
    rows are read (by DuckDB), not the whole listing."""
    if not image_ids or not output.fs.exists(output.path(LISTING_FILE)):
        return {}
    listing = local_or_url(output, LISTING_FILE)
    with connect(output) as connection:
        connection.register("wanted", pd.DataFrame({"image_id": image_ids}))
        rows = connection.execute(
            f"""SELECT image_id, url, "offset", length FROM read_parquet({quote(listing)})
                WHERE image_id IN (SELECT image_id FROM wanted)"""
        ).fetchall()
    return {image_id: (url, int(offset), int(length)) for image_id, url, offset, length in rows}


def faces_of(
    output: Output, image_ids: list[str], run: RunRecord, storage_options: Mapping[str, Any] | None
) -> dict[str, np.ndarray | None]:
    """The face each image's row was scored on, read again from its source and cropped the way the run
    did (`workers.reading.decode_rows`, with the run's input size, pixel limit and alignment); None for an
    image that can no longer be read (moved or deleted since) or no longer gives that face."""
    from fiqa_curator.schemas.batch import item_of
    from fiqa_curator.workers.io import read_range
    from fiqa_curator.workers.reading import decode_rows

    items = {item_of(image_id, run.config.get("align"))[0] for image_id in image_ids}
    listing = read_listing(output, sorted(items))
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
    """The attention maps of the lowest and highest images at every exit (token and full models only),
    asked now of the model process (torch costs ~650 MB and seconds, for a figure of four images: not in
    the driver); None when the model has no quality token or the run record names no checkpoint."""
    config, checkpoint = data.run.model_config_dict, data.run.checkpoint
    if not config or not checkpoint or config.get("mode") == "crfiqa":
        return None
    shown = [(image_id, score) for image_id, score in data.attention if faces.get(image_id) is not None]
    if not shown:
        return None
    try:
        architecture = ViTFIQAConfig.from_dict(config)
        depth = int(data.run.config.get("exit_depth", architecture.depth))
    except (ValueError, TypeError) as error:  # a run record from another version, edited by hand
        logger.warning("no attention figure: the run's model config: %s", error)
        return None
    stack = np.stack([faces[image_id] for image_id, _ in shown])
    asked = AttentionMaps(checkpoint, config, storage_options, stack, depth)
    return AttentionGrid(shown, asked, architecture.grid_size * architecture.patch_size)
