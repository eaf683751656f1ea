"""Error-versus-Discard Characteristic (EDC) curves and their partial areas, two protocols.

`erc` (CR-FIQA `ERC/erc.py` + `ERC/roc.py`, used by the CR-FIQA, ViT-FIQA and EX-FIQA papers):
  comparisons are distances d = arccos(cosine) / pi; genuine and impostor pairs are sorted by ascending pair
  quality (numpy's default argsort, as the reference); at each discard fraction u of 0, 0.05, ..., 0.95 the
  first floor(u * n) pairs are dropped and the threshold is re-estimated on the remaining pairs: the
  candidates are their distinct distances, FMR(t) = share of remaining impostors with d <= t, the candidate
  whose FMR is nearest the target wins (on equal nearness the largest distance); FNMR = share of remaining
  genuine pairs with d >= t. pAUC = trapezoid rule over the grid points up to the discard limit.
  With no impostor left, FMR is undefined and, like the reference, the largest distance is the threshold.
  Pairs of equal pair quality are discarded in the order that sort leaves them in, which follows their
  order in the pairs file: `erc_ties` finds the grid points where such a tie is split, i.e. where the
  curve, and so the pAUC, depends on that order.

`iso` (Schlett et al., arXiv 2303.13294, reference `edc.py`): only genuine comparisons form the curve, with
  similarity scores; the threshold is fixed once (given, from a target FMR on the impostor similarities as
  their (1 - FMR) quantile, or as the `starting_error` quantile of the genuine similarities); an error is a
  genuine similarity strictly below it; pairs of equal pair quality are discarded together; the curve is
  stepwise with a final point (1, 0); pAUC sums error x width up to the limit, optionally minus the area
  under the theoretical best curve.

Pair quality is the min of the two images' qualities (`pair_quality`). Everything is float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fiqa_curator.schemas.errors import UserError

ERC_GRID = np.arange(0, 0.98, 0.05)  # 0, 0.05, ..., 0.95: the reference's exact float values
DEFAULT_FMRS = (1e-2, 1e-3, 1e-4)
GRID_TOLERANCE = 1e-9  # the grid's floats (0.30000000000000004) count as the limit they stand for


def pair_quality(quality_a: np.ndarray, quality_b: np.ndarray) -> np.ndarray:
    return np.minimum(np.asarray(quality_a, dtype=np.float64), np.asarray(quality_b, dtype=np.float64))


def cosine_similarity(embeddings_a: np.ndarray, embeddings_b: np.ndarray) -> np.ndarray:
    a = np.asarray(embeddings_a, dtype=np.float64)
    b = np.asarray(embeddings_b, dtype=np.float64)
    dot = np.einsum("ij,ij->i", a, b)
    return np.clip(dot / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)), -1.0, 1.0)


def angular_distance(similarity: np.ndarray) -> np.ndarray:
    """The `erc` comparison score: arccos(cosine) / pi, 0 for identical directions, 1 for opposite."""
    return np.arccos(np.clip(np.asarray(similarity, dtype=np.float64), -1.0, 1.0)) / math.pi


# ---- erc ---------------------------------------------------------------------------------------------
@dataclass
class ErcResult:
    """`fnmr[fmr]` has one value per grid point in `discard_fractions`; `thresholds[fmr]` the distances."""

    discard_fractions: np.ndarray
    fnmr: dict[float, np.ndarray]
    thresholds: dict[float, np.ndarray]

    def pauc(self, fmr: float, discard_limit: float = 0.3) -> float:
        return erc_pauc(self.discard_fractions, self.fnmr[fmr], discard_limit)


class ErcCurves:
    """Pre-sorts the comparisons once; each method then costs O(n) per grid point (no sorting)."""

    def __init__(self, distances: np.ndarray, genuine: np.ndarray) -> None:
        distances = np.asarray(distances, dtype=np.float64)
        genuine = np.asarray(genuine, dtype=bool)
        if distances.shape != genuine.shape or distances.ndim != 1:
            raise ValueError("distances and genuine flags must be 1-D arrays of the same length")
        self.count = len(distances)
        self._by_distance = np.argsort(distances, kind="stable")
        self._distances = distances[self._by_distance]
        self._genuine = genuine[self._by_distance]

    def evaluate(
        self, pair_qualities: np.ndarray, fmrs: tuple[float, ...] = DEFAULT_FMRS, grid: np.ndarray = ERC_GRID
    ) -> ErcResult:
        pair_qualities = np.asarray(pair_qualities, dtype=np.float64)
        if pair_qualities.shape != (self.count,):
            raise ValueError(f"expected {self.count} pair qualities, got {pair_qualities.shape}")
        discard_order = np.argsort(pair_qualities)  # numpy's default kind, as the reference: same tie order
        position = np.empty(self.count, dtype=np.int64)
        position[discard_order] = np.arange(self.count)
        position_by_distance = position[self._by_distance]
        fnmr = {fmr: np.empty(len(grid)) for fmr in fmrs}
        thresholds = {fmr: np.empty(len(grid)) for fmr in fmrs}
        for step, fraction in enumerate(grid):
            keep = position_by_distance >= int(fraction * self.count)
            distances = self._distances[keep]
            genuine = self._genuine[keep]
            impostor_distances = distances[~genuine]
            genuine_distances = distances[genuine]
            candidates = (
                distances[np.concatenate(([True], distances[1:] != distances[:-1]))]
                if len(distances)
                else distances
            )
            false_matches = np.searchsorted(impostor_distances, candidates, side="right")
            for fmr in fmrs:
                threshold = _erc_threshold(candidates, false_matches, len(impostor_distances), fmr)
                thresholds[fmr][step] = threshold
                if len(genuine_distances) == 0:
                    fnmr[fmr][step] = np.nan
                else:  # same expression as the reference, for the same floats
                    matched = np.searchsorted(genuine_distances, threshold, side="left")
                    fnmr[fmr][step] = 1 - matched / len(genuine_distances)
        return ErcResult(
            discard_fractions=np.asarray(grid, dtype=np.float64), fnmr=fnmr, thresholds=thresholds
        )


def _erc_threshold(candidates: np.ndarray, false_matches: np.ndarray, impostors: int, target: float) -> float:
    if len(candidates) == 0:
        return np.nan
    if impostors == 0:
        return float(
            candidates[-1]
        )  # FMR undefined: the reference's argmin over NaN picks the largest distance
    nearness = np.abs(false_matches / impostors - target)
    # candidates ascend; the reference scans them descending and keeps the first minimum: the largest distance
    return float(candidates[len(candidates) - 1 - int(np.argmin(nearness[::-1]))])


def erc_curves(
    distances: np.ndarray,
    genuine: np.ndarray,
    pair_qualities: np.ndarray,
    fmrs: tuple[float, ...] = DEFAULT_FMRS,
) -> ErcResult:
    return ErcCurves(distances, genuine).evaluate(pair_qualities, fmrs)


@dataclass
class ErcTies:
    """Where the `erc` discard order is decided by the input order rather than by pair quality.

    `boundaries`: one entry per split grid point (JSON-ready): its `discard_fraction`, the pairs it
    discards (`discarded`), the pairs sharing the pair quality at the cut (`tied`) and how many of those
    fall on the discarded side (`tied_discarded`). `pairs`: the pairs in the split tie groups, each
    counted once (a group split at several grid points too).
    """

    boundaries: list[dict[str, float | int]]
    pairs: int


def erc_ties(pair_qualities: np.ndarray, discard_limit: float = 0.3, grid: np.ndarray = ERC_GRID) -> ErcTies:
    """The tie groups that straddle an `erc` discard boundary within the pAUC's range.

    At grid point u, `ErcCurves.evaluate` drops the first k = int(u * n) pairs of the quality order (the
    same expression). With q the qualities sorted ascending, that boundary straddles a tie when
    0 < k < n and q[k - 1] == q[k]: some pairs of that quality are dropped and others kept, and which ones
    is decided by numpy's default (unstable) argsort of the pairs in file order, as in the reference, so
    FNMR at u, and the pAUC through it, can change when the pairs file is reordered. Only the grid points
    the pAUC uses count (u <= discard_limit, with `erc_pauc`'s tolerance); k = 0 and k = n cut nothing.
    A tie lying wholly on one side of every boundary is harmless, and so is the `iso` protocol, which
    discards equal qualities together. NaN qualities never tie (the evaluation drops them beforehand).
    """
    grid = np.asarray(grid, dtype=np.float64)
    ordered = np.sort(np.asarray(pair_qualities, dtype=np.float64))  # the values argsort orders by
    count = len(ordered)
    boundaries: list[dict[str, float | int]] = []
    groups: set[tuple[int, int]] = set()
    for fraction in grid[grid <= discard_limit + GRID_TOLERANCE]:
        cut = int(fraction * count)
        if not 0 < cut < count or ordered[cut - 1] != ordered[cut]:
            continue
        first = int(np.searchsorted(ordered, ordered[cut], side="left"))
        end = int(np.searchsorted(ordered, ordered[cut], side="right"))
        groups.add((first, end))
        boundaries.append(
            {
                "discard_fraction": round(float(fraction), 12),
                "discarded": cut,
                "tied": end - first,
                "tied_discarded": cut - first,
            }
        )
    return ErcTies(boundaries=boundaries, pairs=sum(end - first for first, end in groups))


def erc_pauc(discard_fractions: np.ndarray, fnmr: np.ndarray, discard_limit: float = 0.3) -> float:
    """Trapezoid area over the grid points up to the limit (0.3 -> the 7 points 0..0.3)."""
    use = np.asarray(discard_fractions) <= discard_limit + GRID_TOLERANCE
    x, y = np.asarray(discard_fractions)[use], np.asarray(fnmr)[use]
    if len(x) < 2:
        return 0.0
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


# ---- iso ---------------------------------------------------------------------------------------------
@dataclass
class IsoCurve:
    discard_fractions: np.ndarray
    error_fractions: np.ndarray
    threshold: float
    comparison_count: int
    extra: dict = field(default_factory=dict)

    def pauc(self, discard_limit: float = 0.3, *, minus_theoretical_best: bool = False) -> float:
        area = iso_pauc(self.discard_fractions, self.error_fractions, discard_limit)
        if minus_theoretical_best:
            area -= area_under_theoretical_best(float(self.error_fractions[0]), discard_limit)
        return area


def iso_threshold(
    genuine_similarities: np.ndarray,
    impostor_similarities: np.ndarray | None = None,
    *,
    threshold: float | None = None,
    fmr: float | None = None,
    starting_error: float | None = None,
) -> float:
    """Exactly one of: an explicit threshold; a target FMR on the impostor similarities; a starting error
    (the quantile of the genuine similarities, a starting FNMR). Nothing given means starting_error 0.05."""
    given = [v is not None for v in (threshold, fmr, starting_error)]
    if sum(given) > 1:
        raise UserError("give one of threshold, fmr or starting_error")
    if threshold is not None:
        return float(threshold)
    if fmr is not None:
        if impostor_similarities is None or len(impostor_similarities) == 0:
            raise UserError("a threshold for a target FMR needs impostor comparisons")
        return float(np.quantile(np.asarray(impostor_similarities, dtype=np.float64), 1 - fmr))
    quantile = 0.05 if starting_error is None else starting_error
    return float(np.quantile(np.asarray(genuine_similarities, dtype=np.float64), quantile))


def iso_curve(
    genuine_similarities: np.ndarray, genuine_pair_qualities: np.ndarray, threshold: float
) -> IsoCurve:
    """FNM-EDC over genuine comparisons only, threshold fixed; equal pair qualities are discarded together."""
    similarities = np.asarray(genuine_similarities, dtype=np.float64)
    qualities = np.asarray(genuine_pair_qualities, dtype=np.float64)
    if similarities.shape != qualities.shape or similarities.ndim != 1 or len(similarities) == 0:
        raise UserError("need one pair quality per genuine similarity, at least one comparison")
    order = np.argsort(qualities)
    qualities, similarities = qualities[order], similarities[order]
    count = len(qualities)
    errors = (similarities < threshold).astype(np.int64)
    errors_remaining = np.cumsum(errors[::-1])[::-1]  # errors among comparisons i..n-1
    discard_counts = np.concatenate(([0], np.flatnonzero(qualities[:-1] != qualities[1:]) + 1))
    error_fractions = errors_remaining[discard_counts] / (count - discard_counts)
    discard_fractions = discard_counts / count
    if discard_fractions[-1] != 1:  # the reference's final point at 100% discard
        discard_fractions = np.concatenate((discard_fractions, [1.0]))
        error_fractions = np.concatenate((error_fractions, [0.0]))
    return IsoCurve(discard_fractions, error_fractions, float(threshold), count)


def iso_pauc(discard_fractions: np.ndarray, error_fractions: np.ndarray, discard_limit: float = 0.3) -> float:
    """Stepwise area: each point's error times the width to the next point, the last step cut at the limit."""
    if not 0 <= discard_limit <= 1:
        raise UserError(f"discard limit must be in [0, 1], got {discard_limit}")
    if discard_limit == 0:
        return 0.0
    x = np.asarray(discard_fractions, dtype=np.float64)
    y = np.asarray(error_fractions, dtype=np.float64)
    # the step ends where the next point starts, or at the limit for the step in which the limit falls
    reaches = np.flatnonzero(x[1:] >= discard_limit)
    last = int(reaches[0]) if len(reaches) else len(x) - 1
    widths = np.append(x[1 : last + 1] - x[:last], discard_limit - x[last])
    return float(np.sum(y[: last + 1] * widths))


def area_under_theoretical_best(starting_error: float, discard_limit: float) -> float:
    area = starting_error**2 / 2
    if discard_limit < starting_error:
        area -= (starting_error - discard_limit) ** 2 / 2
    return area


Protocol = Literal["erc", "iso"]
