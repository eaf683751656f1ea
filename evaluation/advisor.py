"""Exit-depth advisor: the smallest exit depth whose best scheme is within a tolerance of the best option.

Options at depth l: the single exit `exit_l`, and the EX-FIQA fusions over exits 1..l, `f@l` (uniform) and
`fw@l` (depth-weighted); all cost one pass through blocks 1..l. Lower pAUC is better.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fiqa_curator.schemas.errors import UserError

_OPTION = re.compile(r"^(?:exit_(\d+)|(f|fw)@(\d+))$")


def depth_fusions(exit_scores: np.ndarray) -> dict[str, np.ndarray]:
    """(N, L) exit scores -> `f@l` and `fw@l` for every l (the scores a run at exit depth l would fuse)."""
    scores = np.asarray(exit_scores, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for depth in range(1, scores.shape[1] + 1):
        head = scores[:, :depth]
        weights = np.arange(1, depth + 1, dtype=np.float64)
        out[f"f@{depth}"] = head.mean(axis=1)
        out[f"fw@{depth}"] = head @ (weights / weights.sum())
    return out


def _option(name: str) -> tuple[int, str] | None:
    match = _OPTION.match(name)
    if not match:
        return None
    if match.group(1):
        return int(match.group(1)), "exit"
    return int(match.group(3)), match.group(2)


def advise(
    pauc: Mapping[str, float],
    *,
    tolerance: float = 0.05,
    gflops_at: Callable[[int], float] | None = None,
) -> dict[str, Any]:
    """pAUC per option name (`exit_l`, `f@l`, `fw@l`; others ignored) -> the recommendation."""
    options = {
        name: (_option(name), value) for name, value in pauc.items() if _option(name) and np.isfinite(value)
    }
    if not options:
        raise UserError("no exit or per-depth fusion options to advise on")
    best_name, ((best_depth, _), best_value) = min(options.items(), key=lambda kv: (kv[1][1], kv[1][0][0]))
    limit = best_value * (1 + tolerance)  # pAUC values are areas under FNMR: never negative
    by_depth: dict[int, tuple[str, float]] = {}
    for name, ((depth, _), value) in options.items():
        if depth not in by_depth or value < by_depth[depth][1]:
            by_depth[depth] = (name, value)
    chosen_depth = min(depth for depth, (_, value) in by_depth.items() if value <= limit)
    chosen_name, chosen_value = by_depth[chosen_depth]
    full_depth = max(by_depth)
    advice: dict[str, Any] = {
        "tolerance": tolerance,
        "best": {"option": best_name, "exit_depth": best_depth, "pauc": best_value},
        "recommended": {
            "option": chosen_name,
            "exit_depth": chosen_depth,
            "scheme": _option(chosen_name)[1],
            "pauc": chosen_value,
            "within": chosen_value / best_value - 1 if best_value else 0.0,
        },
        "per_depth": {
            str(depth): {"option": name, "pauc": value} for depth, (name, value) in sorted(by_depth.items())
        },
    }
    if gflops_at is not None:
        chosen, full = gflops_at(chosen_depth), gflops_at(full_depth)
        advice["recommended"].update(
            gflops_per_image=chosen, gflops_full_depth=full, compute_saved=1 - chosen / full
        )
    return advice
