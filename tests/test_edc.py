"""EDC protocols: hand-computed cases, a brute-force oracle written from the protocol text, properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiqa_curator.evaluation.edc import (
    ERC_GRID,
    angular_distance,
    area_under_theoretical_best,
    cosine_similarity,
    erc_curves,
    erc_pauc,
    erc_ties,
    iso_curve,
    iso_pauc,
    iso_threshold,
    pair_quality,
)


# ---- erc: brute force, one literal reading of the protocol ---------------------------------------------
def erc_brute_force(distances, genuine, qualities, fmr):
    order = sorted(range(len(qualities)), key=lambda i: qualities[i])  # ties: any order (no ties used here)
    out = []
    for u in ERC_GRID:
        kept = order[int(u * len(order)) :]
        d = [distances[i] for i in kept]
        g = [genuine[i] for i in kept]
        impostors = [x for x, is_g in zip(d, g, strict=True) if not is_g]
        genuines = [x for x, is_g in zip(d, g, strict=True) if is_g]
        best = None
        for t in sorted(set(d), reverse=True):  # largest first: the first of equal nearness wins
            nearness = abs(sum(x <= t for x in impostors) / len(impostors) - fmr)
            if best is None or nearness < best[0]:
                best = (nearness, t)
        out.append(1 - sum(x < best[1] for x in genuines) / len(genuines))
    return np.array(out)


def test_erc_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(4)
    for _ in range(5):
        n = 300
        genuine = rng.random(n) < 0.4
        distances = angular_distance(np.where(genuine, rng.normal(0.6, 0.2, n), rng.normal(0, 0.2, n)))
        qualities = rng.permutation(n).astype(float)
        result = erc_curves(distances, genuine, qualities, fmrs=(1e-1, 1e-2))
        for fmr in (1e-1, 1e-2):
            np.testing.assert_array_equal(
                result.fnmr[fmr], erc_brute_force(distances, genuine, qualities, fmr)
            )


def test_erc_hand_computed() -> None:
    # 4 impostors at distances .1 .2 .3 .4, 4 genuine at .05 .15 .25 .35; target FMR 0.25:
    # FMR(t)=k/4 at t in [imp_k, imp_k+1); candidates with FMR 0.25: .1 and .15 -> the larger, .15.
    # FNMR = share of genuine with d >= .15 = 3/4.
    distances = np.array([0.1, 0.2, 0.3, 0.4, 0.05, 0.15, 0.25, 0.35])
    genuine = np.array([False] * 4 + [True] * 4)
    qualities = np.array([8, 7, 6, 5, 4, 3, 2, 1], dtype=float)  # genuine pairs are the worst
    result = erc_curves(distances, genuine, qualities, fmrs=(0.25,))
    assert result.thresholds[0.25][0] == 0.15 and result.fnmr[0.25][0] == 0.75
    # u=0.05..0.1: floor(0.4), floor(0.8) = 0 discarded; u=0.15: 1 discarded (the genuine .35)
    assert result.fnmr[0.25][1] == result.fnmr[0.25][2] == 0.75
    assert result.fnmr[0.25][3] == 1 - 1 / 3  # remaining genuine .05 .15 .25, threshold .15
    assert len(result.discard_fractions) == 20 and result.discard_fractions[-1] == pytest.approx(0.95)


def test_erc_without_impostors_uses_the_largest_distance() -> None:
    distances = np.array([0.1, 0.2, 0.2, 0.4])
    result = erc_curves(distances, np.ones(4, dtype=bool), np.arange(4.0), fmrs=(1e-3,))
    assert result.thresholds[1e-3][0] == 0.4 and result.fnmr[1e-3][0] == 0.25


def test_erc_pauc_trapezoid_and_limits() -> None:
    x = ERC_GRID
    y = np.linspace(0.5, 0.0, len(x))
    assert erc_pauc(x, y, 0.3) == pytest.approx(np.trapezoid(y[:7], x[:7]))
    assert erc_pauc(x, y, 0.33) == erc_pauc(x, y, 0.3)  # grid points up to the limit
    assert erc_pauc(x, y, 0.2) == pytest.approx(np.trapezoid(y[:5], x[:5]))
    assert erc_pauc(x, y, 0.0) == 0.0


def test_erc_perfect_and_reversed_rankings() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    genuine = rng.random(n) < 0.5
    distances = angular_distance(np.where(genuine, rng.normal(0.5, 0.25, n), rng.normal(0.0, 0.15, n)))
    # "oracle": low quality = the genuine pairs that are hardest (largest distance); impostors never discarded
    oracle = np.where(genuine, -distances, 10.0)
    best = erc_curves(distances, genuine, oracle).pauc(1e-2)
    worst = erc_curves(distances, genuine, -oracle).pauc(1e-2)
    assert best < worst


# ---- erc: ties split by a discard boundary -------------------------------------------------------------
def tied_across_a_boundary(qualities, discard_limit):
    """Pairs whose quality v has fewer than k pairs strictly below it and more than k at or below it, for a
    grid cut k = floor(u * n), u up to the limit: counted from the values, without sorting."""
    q = np.asarray(qualities, dtype=float)
    cuts = [int(u * len(q)) for u in ERC_GRID if u <= discard_limit + 1e-9]
    below = np.array([(q < v).sum() for v in q])
    at_or_below = np.array([(q <= v).sum() for v in q])
    return sum(any(b < k < a for k in cuts) for b, a in zip(below, at_or_below, strict=True))


def test_erc_ties_hand_built() -> None:
    # 40 pairs: the cuts up to 0.3 are k = 0, 2, 4, ..., 12; 0.4 adds 14 and 16. In sorted order, groups of
    # equal quality at positions 3..6 (straddles 4 and 6: 4 pairs, counted once), 8..9 (ends exactly on
    # the cuts 8 and 10: harmless), 11..13 (straddles 12: 3 pairs) and 15..17 (straddles 16, beyond 0.3).
    sorted_qualities = np.arange(40.0)
    for first, end in ((3, 7), (8, 10), (11, 14), (15, 18)):
        sorted_qualities[first:end] = first
    qualities = np.random.default_rng(0).permutation(sorted_qualities)
    ties = erc_ties(qualities, 0.3)
    assert ties.pairs == 7 == tied_across_a_boundary(qualities, 0.3)
    assert ties.boundaries == [
        {"discard_fraction": 0.1, "discarded": 4, "tied": 4, "tied_discarded": 1},
        {"discard_fraction": 0.15, "discarded": 6, "tied": 4, "tied_discarded": 3},
        {"discard_fraction": 0.3, "discarded": 12, "tied": 3, "tied_discarded": 1},
    ]
    assert erc_ties(qualities, 0.4).pairs == 10 == tied_across_a_boundary(qualities, 0.4)
    assert erc_ties(qualities, 0.05).pairs == 0  # the cut at 2 falls between distinct qualities
    assert erc_ties(np.arange(40.0), 0.95).pairs == 0 and erc_ties(np.arange(40.0)).boundaries == []
    assert erc_ties(np.full(40, 0.5), 0.3).pairs == 40  # one big tie: every pair's fate is order-dependent


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), levels=st.integers(1, 60), limit=st.floats(0, 1))
def test_erc_ties_count_matches_the_definition(seed: int, n: int, levels: int, limit: float) -> None:
    qualities = np.random.default_rng(seed).integers(0, levels, n).astype(float)
    assert erc_ties(qualities, limit).pairs == tied_across_a_boundary(qualities, limit)


def test_erc_is_order_independent_wherever_no_tie_is_split() -> None:
    """Reordering the pairs changes nothing at the grid points `erc_ties` leaves out, and the tie count
    itself does not depend on the order."""
    rng = np.random.default_rng(3)
    n = 500
    genuine = rng.random(n) < 0.4
    distances = angular_distance(np.where(genuine, rng.normal(0.5, 0.2, n), rng.normal(0, 0.2, n)))
    qualities = rng.integers(0, 40, n).astype(float)  # many ties
    ties = erc_ties(qualities, discard_limit=1.0)  # every grid point
    split = {boundary["discard_fraction"] for boundary in ties.boundaries}
    assert 0 < len(split) < len(ERC_GRID)
    unsplit = np.array([round(u, 12) not in split for u in ERC_GRID])
    base = erc_curves(distances, genuine, qualities, fmrs=(1e-1,)).fnmr[1e-1]
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(n)
        shuffled = erc_curves(distances[order], genuine[order], qualities[order], fmrs=(1e-1,)).fnmr[1e-1]
        np.testing.assert_array_equal(shuffled[unsplit], base[unsplit])
        assert erc_ties(qualities[order], 1.0) == ties


# ---- iso -----------------------------------------------------------------------------------------------
def test_iso_hand_computed_with_ties() -> None:
    similarities = np.array([0.1, 0.9, 0.2, 0.8, 0.7])
    qualities = np.array([1.0, 2.0, 1.0, 3.0, 4.0])  # two pairs tie at the lowest quality
    curve = iso_curve(similarities, qualities, threshold=0.5)
    # errors (sim < .5): the two quality-1 pairs. Points: discard 0 -> 2/5; discard 2 (both ties) -> 0/3;
    # discard 3 -> 0/2; discard 4 -> 0/1; then (1, 0).
    np.testing.assert_allclose(curve.discard_fractions, [0, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(curve.error_fractions, [0.4, 0, 0, 0, 0])
    assert curve.pauc(0.3) == pytest.approx(0.4 * 0.3)
    assert curve.pauc(0.5) == pytest.approx(0.4 * 0.4)  # limit between points
    assert curve.pauc(0.3, minus_theoretical_best=True) == pytest.approx(0.12 - (0.4**2 / 2 - 0.1**2 / 2))
    assert curve.pauc(0.5, minus_theoretical_best=True) == pytest.approx(0.16 - 0.4**2 / 2)


def test_iso_reversed_ranking_and_all_genuine_errors() -> None:
    similarities = np.array([0.1, 0.2, 0.8, 0.9])
    good = iso_curve(similarities, np.array([1.0, 2.0, 3.0, 4.0]), 0.5)  # errors discarded first
    bad = iso_curve(similarities, np.array([4.0, 3.0, 2.0, 1.0]), 0.5)
    np.testing.assert_allclose(good.error_fractions, [0.5, 1 / 3, 0, 0, 0])
    np.testing.assert_allclose(bad.error_fractions, [0.5, 2 / 3, 1, 1, 0])
    assert good.pauc(1.0) < bad.pauc(1.0)
    everything_wrong = iso_curve(similarities, np.arange(4.0), 1.0)
    np.testing.assert_allclose(everything_wrong.error_fractions, [1, 1, 1, 1, 0])


def test_iso_thresholds() -> None:
    genuine = np.linspace(0, 1, 101)
    impostor = np.linspace(-1, 0, 1001)
    assert iso_threshold(genuine) == pytest.approx(0.05)  # starting error 0.05 by default
    assert iso_threshold(genuine, starting_error=0.2) == pytest.approx(0.2)
    assert iso_threshold(genuine, impostor, fmr=0.01) == pytest.approx(np.quantile(impostor, 0.99))
    assert iso_threshold(genuine, threshold=0.33) == 0.33
    with pytest.raises(ValueError, match="one of"):
        iso_threshold(genuine, threshold=0.1, fmr=0.1)
    with pytest.raises(ValueError, match="impostor"):
        iso_threshold(genuine, fmr=0.01)


def test_iso_pauc_edges() -> None:
    assert iso_pauc(np.array([0.0, 1.0]), np.array([0.3, 0.0]), 0.0) == 0.0
    assert iso_pauc(np.array([0.0, 1.0]), np.array([0.3, 0.0]), 1.0) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        iso_pauc(np.array([0.0, 1.0]), np.array([0.3, 0.0]), 1.5)
    assert area_under_theoretical_best(0.1, 0.3) == pytest.approx(0.005)


def test_helpers() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 0.0], [0.0, -1.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [1.0, -1.0])
    np.testing.assert_allclose(angular_distance(np.array([1.0, 0.0, -1.0])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(pair_quality(np.array([1, 5]), np.array([3, 2])), [1, 2])


# ---- properties ----------------------------------------------------------------------------------------
def _synthetic(seed: int, n: int = 3000):
    rng = np.random.default_rng(seed)
    genuine = rng.random(n) < 0.3
    similarity = np.where(genuine, rng.normal(0.45, 0.2, n), rng.normal(0.0, 0.12, n))
    return rng, genuine, similarity


def test_random_ranking_is_flat_on_average() -> None:
    curves = []
    for seed in range(20):
        rng, genuine, similarity = _synthetic(seed)
        threshold = iso_threshold(similarity[genuine], starting_error=0.1)
        curve = iso_curve(similarity[genuine], rng.random(genuine.sum()), threshold)
        grid = np.linspace(0, 0.5, 6)
        curves.append(np.interp(grid, curve.discard_fractions, curve.error_fractions))
    mean = np.mean(curves, axis=0)
    assert np.all(np.abs(mean - mean[0]) < 0.02), mean


def test_oracle_is_never_worse_than_random() -> None:
    for seed in range(5):
        rng, genuine, similarity = _synthetic(seed)
        distances = angular_distance(similarity)
        oracle = np.where(genuine, similarity, 10.0)  # genuine quality = how well they match
        random = rng.random(len(similarity))
        threshold = iso_threshold(similarity[genuine], starting_error=0.05)
        assert iso_curve(similarity[genuine], oracle[genuine], threshold).pauc(0.3) <= iso_curve(
            similarity[genuine], random[genuine], threshold
        ).pauc(0.3)
        # up to 0.2: with 30% genuine pairs the oracle would have discarded them all by 0.3
        assert erc_curves(distances, genuine, oracle).pauc(1e-2, 0.2) <= erc_curves(
            distances, genuine, random
        ).pauc(1e-2, 0.2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100), shift=st.floats(-50, 50), cube=st.booleans())
def test_invariant_to_monotone_transforms_of_quality(
    seed: int, scale: float, shift: float, cube: bool
) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    genuine = rng.random(n) < 0.4
    similarity = np.round(np.where(genuine, rng.normal(0.5, 0.2, n), rng.normal(0, 0.2, n)), 2)
    quality = np.round(rng.normal(size=n), 1)  # ties included
    transformed = (quality**3 if cube else quality) * scale + shift
    if not np.array_equal(np.argsort(quality, kind="stable"), np.argsort(transformed, kind="stable")) or len(
        np.unique(transformed)
    ) != len(np.unique(quality)):
        return  # float rounding merged or reordered values: not a monotone transform any more
    threshold = iso_threshold(similarity[genuine], starting_error=0.1)
    a = iso_curve(similarity[genuine], quality[genuine], threshold)
    b = iso_curve(similarity[genuine], transformed[genuine], threshold)
    np.testing.assert_array_equal(a.error_fractions, b.error_fractions)
    # erc: argsort is comparison-based, so an order-preserving transform gives the same order, ties included
    distances = angular_distance(similarity)
    ea = erc_curves(distances, genuine, quality)
    eb = erc_curves(distances, genuine, transformed)
    for fmr in ea.fnmr:
        np.testing.assert_array_equal(ea.fnmr[fmr], eb.fnmr[fmr])
