"""`fiqa evaluate` as a function: quality table + pairs + embeddings -> EDC result, advice, written outputs.

Wires the evaluation package (numpy-only protocols, loading, advisor, fitting) to OUTPUT storage; the CLI
and the demo call it. The pairs are read first, and the quality table and embeddings only for the images
they name. `tie_warnings` words the result's `order_dependent` finding (erc) for people.
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
    pairs_a, pairs_b, genuine = load_pairs(pairs, storage_options)
    wanted = {*pairs_a, *pairs_b}  # only these images' rows are read: memory follows the pairs
    ids, found = load_methods(quality, storage_options, ids=wanted)
    if methods:
        missing = [m for m in methods if m not in found]
        if missing:
            raise UserError(f"unknown methods {missing}; available: {', '.join(found)}")
        found = {m: found[m] for m in methods}
    data = prepare(
        ids,
        found,
        load_embeddings(embeddings or quality, storage_options, ids=wanted),
        pairs_a,
        pairs_b,
        genuine,
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


TIE_LINES = 5  # methods listed by `tie_warnings`


def tie_warnings(result: Mapping[str, Any]) -> list[str]:
    """Lines for people when an `erc` pAUC depends on the order of the pairs file; none otherwise (and
    never for `iso`). The first line says what and why, then one line per affected method: how many pairs
    are tied across a discard boundary and at which discard fractions (up to the discard limit)."""
    found = result.get("order_dependent") or {}
    affected = found.get("methods") or {}
    if not affected:
        return []
    lines = [
        f"warning: erc pAUC up to {found['discard_limit']:g} depends on the order of the pairs file for "
        f"{len(affected)} of {len(result['methods'])} method(s): pairs of equal pair quality straddle a "
        f"discard boundary, and which of them are discarded first follows their order in the file (as in "
        f"the reference implementation), so reordering the pairs can change these figures"
    ]
    # the most affected first; a fiqa table has ~40 methods, so the rest are counted, not listed
    ranked = sorted(affected.items(), key=lambda item: (-item[1]["pairs"], item[0]))
    for name, ties in ranked[:TIE_LINES]:
        at = ", ".join(f"{boundary['discard_fraction']:g}" for boundary in ties["boundaries"])
        lines.append(
            f"  {name}: {ties['pairs']} of {result['pairs_used']} pairs tied across a boundary "
            f"(at discard fraction{'s' if len(ties['boundaries']) > 1 else ''} {at})"
        )
    if len(ranked) > TIE_LINES:
        lines.append(
            f"  ... and {len(ranked) - TIE_LINES} more method(s): `order_dependent` in the JSON result"
        )
    return lines
