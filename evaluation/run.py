"""`fiqa evaluate`: quality tables + comparison pairs + embeddings in, EDC curves and pAUC per method out.

Methods: every numeric column of a quality Parquet (`image_id` + one column per method), or, for a fiqa
OUTPUT folder, every exit (`exit_1..exit_L`, from `exit_scores`) and `quality_final`, `quality_f`,
`quality_fw`. Pairs (`image_id_a`, `image_id_b`, `genuine`) whose images lack a quality (failed rows) or
an embedding are left out, and the result says how many.

Loading is bounded by the pairs: given the pairs' image ids, `load_methods` and `load_embeddings` read only
those images' rows (and only the columns they use), filtering while the file is scanned, so memory follows
the images in the pairs, not the table's rows. Without ids they read everything, as before.

With `erc`, the result's `order_dependent` names the methods whose pAUC depends on the order of the pairs
file (tied pair qualities split at a discard boundary, `edc.erc_ties`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from fiqa_curator.evaluation.advisor import advise, depth_fusions
from fiqa_curator.evaluation.edc import (
    DEFAULT_FMRS,
    ErcCurves,
    angular_distance,
    cosine_similarity,
    erc_ties,
    iso_curve,
    iso_threshold,
    pair_quality,
)
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import RUN_FILE, SCORES, RunRecord
from fiqa_curator.schemas.quality_table import exit_score_matrix

FIQA_SCORE_COLUMNS = ("quality_final", "quality_f", "quality_fw")
REPORTED_LIMITS = (0.2, 0.3)


Columns = Callable[[pa.Schema], list[str]]  # a table's schema -> the columns a loader needs from it


def _id_filter(schema: pa.Schema, ids: Collection[str]) -> pc.Expression:
    """`image_id` is one of `ids` (a non-string column is compared as text; nulls never match)."""
    column = pc.field("image_id")
    kind = schema.field("image_id").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        column = column.cast(pa.string())
    return column.isin(pa.array(sorted(ids), pa.string()))


def _read_parquet(path: str, fs: Any, ids: Collection[str] | None, columns: Columns | None) -> pa.Table:
    if ids is None:
        return pq.read_table(path, filesystem=fs)
    schema = pq.ParquetDataset(path, filesystem=fs).schema  # footers only (the file, or the folder's first)
    if "image_id" not in schema.names:
        return schema.empty_table()  # the caller's column check says what is missing
    # the same reader as above, with a projection and a filter: the scan reads a batch at a time and keeps
    # only the rows that pass, so memory follows the matching rows (plus the scan's read-ahead)
    return pq.read_table(
        path, filesystem=fs, columns=columns(schema) if columns else None, filters=_id_filter(schema, ids)
    )


def _read_csv(path: str, fs: Any, ids: Collection[str] | None, columns: Columns | None) -> pa.Table:
    def project(table: pa.Table) -> pa.Table:
        return table.select(columns(table.schema)) if columns else table

    with fs.open(path, "rb") as handle:
        if ids is None:
            return pacsv.read_csv(handle)
        try:  # streamed, a block at a time: only the matching rows stay
            reader = pacsv.open_csv(handle)
            if "image_id" not in reader.schema.names:
                return reader.schema.empty_table()
            matching = _id_filter(reader.schema, ids)
            return project(pa.Table.from_batches([b.filter(matching) for b in reader], reader.schema))
        except pa.ArrowInvalid:
            pass  # a later block that the first block's column types do not fit: read_csv widens them
    with fs.open(path, "rb") as handle:  # (or not a CSV at all: read_csv raises what it raised before)
        table = pacsv.read_csv(handle)
    if "image_id" not in table.column_names:
        return table.schema.empty_table()
    return project(table.filter(_id_filter(table.schema, ids)))


def _read_table(
    url: str,
    storage_options: Mapping[str, Any] | None,
    *,
    ids: Collection[str] | None = None,
    columns: Columns | None = None,
) -> pa.Table:
    """A user's file (or a fiqa OUTPUT's table); one that is not a readable table is a UserError.

    With `ids`, only the rows whose `image_id` is among them (in file order), filtered while reading, and
    only the `columns` picked from the schema; a table without `image_id` then comes back empty, schema
    only. Types and values are those of a full read (Parquet: the same reader, given a filter; CSV:
    streamed, falling back to a full read when a later block needs wider types than the first). Without
    `ids`, the whole table, as before.
    """
    fs, path = url_to_fs(url, **dict(storage_options or {}))
    try:
        if fs.isdir(path):
            scores = path.rstrip("/") + "/" + SCORES
            return _read_parquet(scores if fs.isdir(scores) else path, fs, ids, columns)
        if path.endswith(".csv"):
            return _read_csv(path, fs, ids, columns)
        return _read_parquet(path, fs, ids, columns)
    except pa.ArrowInvalid as error:  # not Parquet / CSV, or malformed
        raise UserError(f"{url}: not a readable table: {error}") from error


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind)


def _method_columns(schema: pa.Schema) -> list[str]:
    """What `load_methods` reads: `image_id` and the score columns (a fiqa table's other columns, its
    embeddings among them, stay on disk)."""
    if "exit_scores" in schema.names:
        wanted = {"image_id", "exit_scores", "exit_depth", *FIQA_SCORE_COLUMNS}
        return [name for name in schema.names if name in wanted]
    return [name for name in schema.names if name == "image_id" or _is_number(schema.field(name).type)]


def load_methods(
    url: str, storage_options: Mapping[str, Any] | None = None, *, ids: Collection[str] | None = None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """(image ids, method -> quality per image); NaN where an image has no score. With `ids`, only those
    images' rows are read (in table order; ids not in the table are simply absent)."""
    table = _read_table(url, storage_options, ids=ids, columns=_method_columns)
    if "image_id" not in table.column_names:
        raise UserError(f"{url}: a quality table needs an `image_id` column")
    image_ids = table.column("image_id").to_pylist()
    methods: dict[str, np.ndarray] = {}
    if "exit_scores" in table.column_names:  # a fiqa quality table
        grid = exit_score_matrix(table)
        for exit_index in range(grid.shape[1]):
            methods[f"exit_{exit_index + 1}"] = grid[:, exit_index]
        for name in FIQA_SCORE_COLUMNS:
            methods[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        methods.update(depth_fusions(grid))  # f@l, fw@l: what a run stopped at l would have fused
    else:
        for name in table.column_names:
            if name != "image_id" and _is_number(table.schema.field(name).type):
                methods[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    if not methods:
        raise UserError(f"{url}: no numeric quality columns")
    return image_ids, methods


def _embedding_columns(schema: pa.Schema) -> list[str]:
    return [name for name in schema.names if name in ("image_id", "embedding")]


def load_embeddings(
    url: str, storage_options: Mapping[str, Any] | None = None, *, ids: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """image id -> embedding (float64), rows without one left out. With `ids`, only those images' rows."""
    table = _read_table(url, storage_options, ids=ids, columns=_embedding_columns)
    if not {"image_id", "embedding"} <= set(table.column_names):
        raise UserError(
            f"{url}: no embeddings (`image_id` + `embedding` columns): pass --embeddings, or score "
            f"with `fiqa score --embeddings`"
        )
    vectors = table.column("embedding").to_pylist()
    return {
        i: np.asarray(v, dtype=np.float64)
        for i, v in zip(table.column("image_id").to_pylist(), vectors, strict=True)
        if v is not None
    }


def load_pairs(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    table = _read_table(url, storage_options)
    if not {"image_id_a", "image_id_b", "genuine"} <= set(table.column_names):
        raise UserError(f"{url}: pairs need `image_id_a`, `image_id_b`, `genuine` columns")
    try:
        genuine = np.asarray(
            [bool(int(g)) if not isinstance(g, bool) else g for g in table.column("genuine").to_pylist()]
        )
    except (TypeError, ValueError) as error:
        raise UserError(f"{url}: `genuine` must be 0/1 or true/false: {error}") from error
    return (
        [str(x) for x in table.column("image_id_a").to_pylist()],
        [str(x) for x in table.column("image_id_b").to_pylist()],
        genuine,
    )


@dataclass
class EvaluationInput:
    similarity: np.ndarray  # cosine similarity per usable pair
    genuine: np.ndarray
    pair_qualities: dict[str, np.ndarray]
    pairs_total: int
    pairs_dropped: int
    index_a: np.ndarray  # image index (into the quality table's ids) of each usable pair's images
    index_b: np.ndarray


def prepare(
    ids: Sequence[str],
    methods: Mapping[str, np.ndarray],
    embeddings: Mapping[str, np.ndarray],
    pairs_a: Sequence[str],
    pairs_b: Sequence[str],
    genuine: np.ndarray,
) -> EvaluationInput:
    index = {image_id: i for i, image_id in enumerate(ids)}
    usable = []
    for k, (a, b) in enumerate(zip(pairs_a, pairs_b, strict=True)):
        ia, ib = index.get(a), index.get(b)
        if ia is None or ib is None or a not in embeddings or b not in embeddings:
            continue
        if any(not (np.isfinite(m[ia]) and np.isfinite(m[ib])) for m in methods.values()):
            continue
        usable.append((k, ia, ib))
    if not usable:
        raise UserError("no usable pair: every pair misses a quality score or an embedding")
    rows = np.array(usable)
    emb_a = np.stack([embeddings[pairs_a[k]] for k in rows[:, 0]])
    emb_b = np.stack([embeddings[pairs_b[k]] for k in rows[:, 0]])
    return EvaluationInput(
        similarity=cosine_similarity(emb_a, emb_b),
        genuine=np.asarray(genuine)[rows[:, 0]],
        pair_qualities={
            name: pair_quality(values[rows[:, 1]], values[rows[:, 2]]) for name, values in methods.items()
        },
        pairs_total=len(pairs_a),
        pairs_dropped=len(pairs_a) - len(usable),
        index_a=rows[:, 1],
        index_b=rows[:, 2],
    )


def model_config_of(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The model config recorded in a fiqa OUTPUT's run record, if INPUT is one."""
    fs, path = url_to_fs(url, **dict(storage_options or {}))
    run = path.rstrip("/") + "/" + RUN_FILE
    if not fs.isdir(path) or not fs.exists(run):
        return None
    return RunRecord.from_json(fs.cat_file(run)).model_config_dict


def add_advice(
    result: dict[str, Any],
    *,
    operating_point: str,
    tolerance: float = 0.05,
    model_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Attach the exit-depth advisor's recommendation for one operating point (an FMR label)."""
    from fiqa_curator.workers.config import ViTFIQAConfig

    pauc = {
        name: points[operating_point]["pauc"]
        for name, points in result["methods"].items()
        if operating_point in points
    }
    config = ViTFIQAConfig.from_dict(model_config) if model_config is not None else None

    def gflops(depth: int) -> float:
        assert config is not None
        return config.flops_at_exit(depth) / 1e9

    advice = advise(pauc, tolerance=tolerance, gflops_at=gflops if config is not None else None)
    result["advisor"] = {"operating_point": operating_point, **advice}
    return result


def evaluate(
    data: EvaluationInput,
    protocol: str = "erc",
    *,
    fmrs: Sequence[float] = DEFAULT_FMRS,
    discard_limit: float = 0.3,
    threshold: float | None = None,
    starting_error: float | None = None,
) -> dict[str, Any]:
    """Machine-readable result: per method and operating point, the pAUC values and the curve.

    `erc` adds `order_dependent`: {"discard_limit", "methods": {method: {"pairs", "boundaries"}}}, listing
    only the methods with tied pair qualities split at a grid point up to the discard limit (`erc_ties`),
    whose pAUC therefore depends on the order of the pairs file; an empty `methods` means none does. `iso`
    discards ties together and has no such field."""
    limits = sorted({discard_limit, *REPORTED_LIMITS})
    result: dict[str, Any] = {
        "protocol": protocol,
        "discard_limit": discard_limit,
        "pairs": data.pairs_total,
        "pairs_used": data.pairs_total - data.pairs_dropped,
        "pairs_dropped": data.pairs_dropped,
        "methods": {},
    }
    if protocol == "erc":
        curves = ErcCurves(angular_distance(data.similarity), data.genuine)
        for name, qualities in data.pair_qualities.items():
            erc = curves.evaluate(qualities, tuple(fmrs))
            result["methods"][name] = {
                f"{fmr:g}": {
                    "pauc": erc.pauc(fmr, discard_limit),
                    **{f"pauc@{limit:g}": erc.pauc(fmr, limit) for limit in limits},
                    "discard_fractions": erc.discard_fractions.round(12).tolist(),
                    "fnmr": erc.fnmr[fmr].tolist(),
                    "thresholds": erc.thresholds[fmr].tolist(),
                }
                for fmr in fmrs
            }
        ties = {name: erc_ties(qualities, discard_limit) for name, qualities in data.pair_qualities.items()}
        result["order_dependent"] = {
            "discard_limit": discard_limit,
            "methods": {
                name: {"pairs": found.pairs, "boundaries": found.boundaries}
                for name, found in ties.items()
                if found.pairs
            },
        }
        return result
    if protocol != "iso":
        raise UserError(f"protocol must be erc or iso, got {protocol!r}")
    genuine_similarity = data.similarity[data.genuine]
    impostor_similarity = data.similarity[~data.genuine]
    if threshold is not None or starting_error is not None or not len(impostor_similarity):
        points = {
            "fixed" if threshold is not None else f"starting_error={starting_error or 0.05:g}": iso_threshold(
                genuine_similarity, threshold=threshold, starting_error=starting_error
            )
        }
    else:
        points = {f"{fmr:g}": iso_threshold(genuine_similarity, impostor_similarity, fmr=fmr) for fmr in fmrs}
    for name, qualities in data.pair_qualities.items():
        result["methods"][name] = {}
        for label, value in points.items():
            curve = iso_curve(genuine_similarity, qualities[data.genuine], value)
            result["methods"][name][label] = {
                "threshold": value,
                "pauc": curve.pauc(discard_limit),
                **{f"pauc@{limit:g}": curve.pauc(limit) for limit in limits},
                "pauc_minus_best": curve.pauc(discard_limit, minus_theoretical_best=True),
                "discard_fractions": curve.discard_fractions.tolist(),
                "fnmr": curve.error_fractions.tolist(),
            }
    return result


def add_fusion_fit(
    result: dict[str, Any],
    ids: Sequence[str],
    methods: Mapping[str, np.ndarray],
    data: EvaluationInput,
    *,
    protocol: str,
    fmr: float,
    discard_limit: float,
) -> dict[str, Any]:
    """Attach fitted fusion weights (fit on one half of the images, reported on the other)."""
    from fiqa_curator.evaluation.fitting import fit_fusion

    exits = sorted((int(name.split("_")[1]), name) for name in methods if name.startswith("exit_"))
    if not exits:
        raise UserError("--fit-fusion needs a fiqa quality table (per-exit scores)")
    grid = np.stack([methods[name] for _, name in exits], axis=1)
    fitted = fit_fusion(
        list(ids),
        grid,
        data.index_a,
        data.index_b,
        data.similarity,
        data.genuine,
        protocol=protocol,
        fmr=fmr,
        discard_limit=discard_limit,
    )
    result["fusion_fit"] = {
        "weights": fitted.weights.tolist(),
        "fusion": fitted.spec,
        "fmr": fmr,
        "fit_pauc": fitted.fit_pauc,
        "heldout_pauc": fitted.heldout_pauc,
        "fit_pairs": fitted.fit_pairs,
        "heldout_pairs": fitted.heldout_pairs,
        "evaluations": fitted.evaluations,
    }
    return result
