"""Fusion-weight fitting (beyond the EX-FIQA paper): non-negative exit weights that minimise pAUC.

pAUC is a step function of the weights (it only changes when the ranking of pairs changes), so there is no
gradient to follow: the search is derivative-free and seeded. It starts from F, FW and every single exit,
samples the simplex (Dirichlet), then refines the best point with shrinking coordinate moves. Pairs are
split by their images into a fitting half and a held-out half (a pair belongs to a half when both of its
images do), and the result reports held-out pAUC for the fitted weights next to F and FW.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fiqa_curator.evaluation.edc import ErcCurves, angular_distance, iso_curve, iso_threshold
from fiqa_curator.schemas.errors import UserError


def image_half(image_id: str) -> int:
    """A stable 0/1 split of images (same answer on every machine and run)."""
    return hashlib.sha256(image_id.encode()).digest()[0] & 1


@dataclass
class FusionFit:
    weights: np.ndarray
    fit_pauc: dict[str, float]  # on the fitting half: "fitted", and F and FW for comparison
    heldout_pauc: dict[str, float]
    fit_pairs: int
    heldout_pairs: int
    evaluations: int

    @property
    def spec(self) -> str:
        """What `fiqa score --fusion` takes."""
        return ",".join(f"{w:.6g}" for w in self.weights)


def make_objective(
    exit_grid: np.ndarray,
    index_a: np.ndarray,
    index_b: np.ndarray,
    similarity: np.ndarray,
    genuine: np.ndarray,
    *,
    protocol: str,
    fmr: float,
    discard_limit: float,
) -> Callable[[np.ndarray], float]:
    """weights -> pAUC of the fused per-image quality over the given pairs (lower is better)."""
    if protocol == "erc":
        curves = ErcCurves(angular_distance(similarity), genuine)

        def erc_objective(weights: np.ndarray) -> float:
            fused = exit_grid @ weights
            return curves.evaluate(np.minimum(fused[index_a], fused[index_b]), (fmr,)).pauc(
                fmr, discard_limit
            )

        return erc_objective
    impostors = similarity[~genuine]
    threshold = iso_threshold(
        similarity[genuine], impostors if len(impostors) else None, fmr=fmr if len(impostors) else None
    )

    def iso_objective(weights: np.ndarray) -> float:
        fused = exit_grid @ weights
        quality = np.minimum(fused[index_a], fused[index_b])[genuine]
        return iso_curve(similarity[genuine], quality, threshold).pauc(discard_limit)

    return iso_objective


def search_weights(
    objective: Callable[[np.ndarray], float], depth: int, *, seed: int = 0, samples: int = 96, rounds: int = 6
) -> tuple[np.ndarray, float, int]:
    rng = np.random.default_rng(seed)
    ramp = np.arange(1, depth + 1, dtype=np.float64)
    starts = [np.full(depth, 1 / depth), ramp / ramp.sum(), *np.eye(depth)]
    starts += list(rng.dirichlet(np.ones(depth), size=samples))
    scored = [(objective(w), i, w) for i, w in enumerate(starts)]
    best_value, _, best = min(scored, key=lambda t: (t[0], t[1]))
    evaluations = len(scored)
    step = 0.5
    for _ in range(rounds):
        improved = False
        for k in range(depth):
            for direction in (1.0, -1.0):
                candidate = best.copy()
                candidate[k] = max(0.0, candidate[k] + direction * step * max(candidate[k], 1 / depth))
                if candidate.sum() <= 0:
                    continue
                candidate /= candidate.sum()
                value = objective(candidate)
                evaluations += 1
                if value < best_value:
                    best_value, best, improved = value, candidate, True
        if not improved:
            step /= 2
    return best, best_value, evaluations


def fit_fusion(
    image_ids: list[str],
    exit_grid: np.ndarray,
    index_a: np.ndarray,
    index_b: np.ndarray,
    similarity: np.ndarray,
    genuine: np.ndarray,
    *,
    protocol: str = "erc",
    fmr: float = 1e-3,
    discard_limit: float = 0.3,
    seed: int = 0,
) -> FusionFit:
    halves = np.array([image_half(i) for i in image_ids])
    half_a, half_b = halves[index_a], halves[index_b]
    fit, heldout = (half_a == 0) & (half_b == 0), (half_a == 1) & (half_b == 1)
    if fit.sum() == 0 or heldout.sum() == 0 or not genuine[fit].any() or not genuine[heldout].any():
        raise UserError("too few pairs to fit fusion weights: each half needs genuine pairs")

    def objective_on(mask: np.ndarray) -> Callable[[np.ndarray], float]:
        return make_objective(
            exit_grid,
            index_a[mask],
            index_b[mask],
            similarity[mask],
            genuine[mask],
            protocol=protocol,
            fmr=fmr,
            discard_limit=discard_limit,
        )

    depth = exit_grid.shape[1]
    fit_objective = objective_on(fit)
    weights, fit_value, evaluations = search_weights(fit_objective, depth, seed=seed)
    heldout_objective = objective_on(heldout)
    ramp = np.arange(1, depth + 1, dtype=np.float64)
    baselines = {"f": np.full(depth, 1 / depth), "fw": ramp / ramp.sum()}
    return FusionFit(
        weights=weights,
        fit_pauc={"fitted": fit_value, **{name: fit_objective(w) for name, w in baselines.items()}},
        heldout_pauc={
            "fitted": heldout_objective(weights),
            **{name: heldout_objective(w) for name, w in baselines.items()},
        },
        fit_pairs=int(fit.sum()),
        heldout_pairs=int(heldout.sum()),
        evaluations=evaluations,
    )
