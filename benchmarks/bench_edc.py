"""EDC evaluation cost: N comparison pairs, M quality methods, three FMRs, both protocols, in one run.

python benchmarks/bench_edc.py [--pairs 1000000] [--methods 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fiqa_curator.evaluation.edc import ErcCurves, angular_distance, iso_curve, iso_threshold


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--methods", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    genuine = rng.random(args.pairs) < 0.1
    similarity = np.where(genuine, rng.normal(0.5, 0.2, args.pairs), rng.normal(0.0, 0.1, args.pairs))
    qualities = [rng.normal(size=args.pairs) + 0.5 * similarity * genuine for _ in range(args.methods)]

    start = time.perf_counter()
    curves = ErcCurves(angular_distance(similarity), genuine)
    erc = [curves.evaluate(q, (1e-2, 1e-3, 1e-4)) for q in qualities]
    erc_seconds = time.perf_counter() - start

    start = time.perf_counter()
    impostors = similarity[~genuine]
    thresholds = [iso_threshold(similarity[genuine], impostors, fmr=fmr) for fmr in (1e-2, 1e-3, 1e-4)]
    iso = [iso_curve(similarity[genuine], q[genuine], t) for q in qualities for t in thresholds]
    iso_seconds = time.perf_counter() - start
    print(
        f"{args.pairs} pairs ({genuine.sum()} genuine), {args.methods} methods, 3 FMRs: "
        f"erc {erc_seconds:.1f} s (20 grid points each), iso {iso_seconds:.1f} s; "
        f"example pAUC erc {erc[0].pauc(1e-3):.4f}, iso {iso[0].pauc(0.3):.4f}"
    )


if __name__ == "__main__":
    main()
