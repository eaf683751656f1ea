"""`fiqa evaluate` as a function: quality table + pairs + embeddings -> EDC result, advice, written outputs.

Wires the evaluation package (numpy-only protocols, loading, advisor, fitting) to OUTPUT storage; the CLI
and the demo call it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fiqa_curator.evaluation.edc import DEFAULT_FMRS
from fiqa_curator.evaluation.run import (
    add_advice,
    add_fusion_fit,
    evaluate,
    load_embeddings,
    load_methods,
    load_pairs,
    model_config_of,
    prepare,
)
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import EVALUATION
from fiqa_curator.workers.config import ViTFIQAConfig

EVALUATION_FOLDER = EVALUATION  # QUALITY/evaluation: where `fiqa report` looks for an evaluation


def run_evaluation(
    quality: str,
    pairs: str,
    *,
    embeddings: str | None = None,
    protocol: str = "erc",
    fmrs: Sequence[float] = DEFAULT_FMRS,
    discard_limit: float = 0.3,
    threshold: float | None = None,
    starting_error: float | None = None,
    methods: Sequence[str] | None = None,
    tolerance: float = 0.05,
    advise_fmr: float = 1e-3,
    fit_fusion: bool = False,
    output: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str], str | None]:
    """`fiqa evaluate` as a function: (result, files written, output URL). With a fiqa quality table the
    result has every exit, the per-depth fusions and the advisor's recommendation; `output` gets
    result.json, curves/summary Parquet and the plots (`fiqa report` shows them when `output` is
    QUALITY/evaluation)."""
    ids, found = load_methods(quality, storage_options)
    if methods:
        missing = [m for m in methods if m not in found]
        if missing:
            raise UserError(f"unknown methods {missing}; available: {', '.join(found)}")
        found = {m: found[m] for m in methods}
    data = prepare(
        ids,
        found,
        load_embeddings(embeddings or quality, storage_options),
        *load_pairs(pairs, storage_options),
    )
    result = evaluate(
        data,
        protocol,
        fmrs=fmrs,
        discard_limit=discard_limit,
        threshold=threshold,
        starting_error=starting_error,
    )
    model_config = model_config_of(quality, storage_options)
    if any(name.startswith("fw@") for name in result["methods"]):  # a fiqa table: exits and per-depth fusions
        points = list(next(iter(result["methods"].values())))
        point = f"{advise_fmr:g}" if f"{advise_fmr:g}" in points else points[0]
        add_advice(result, operating_point=point, tolerance=tolerance, model_config=model_config)
    if fit_fusion:
        add_fusion_fit(
            result, ids, found, data, protocol=protocol, fmr=advise_fmr, discard_limit=discard_limit
        )
    if not output:
        return result, [], None
    from fiqa_curator.evaluation.outputs import write_evaluation

    target = Output(output, storage_options)
    target.ensure_writable()
    config = ViTFIQAConfig.from_dict(model_config) if model_config else None
    written = write_evaluation(
        result, target.commit_bytes, (lambda depth: config.flops_at_exit(depth) / 1e9) if config else None
    )
    return result, written, target.full_url()
