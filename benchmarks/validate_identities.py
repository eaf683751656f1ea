"""`fiqa identities` against known label noise on the real faces of the sample dataset.

    ./scripts/demo        # once: builds fiqa-output/demo (sample set, quality table, dlib embeddings)
    python benchmarks/validate_identities.py [--demo fiqa-output/demo] [--seeds 0 1 2 3 4] [--json FILE]

For each seed (`demo_kit.identity_noise`): 5% of the images get another identity's label, 3 identities
are filed twice (half of their images under `<name>__alias`); `fiqa identities` runs with dlib's 128-d
embeddings (`data/fr_embeddings.parquet`) and the demo model's quality, with and without quality weights.
Printed per severity group (clean; clean + severity 1; mild = severities 1-2; clean + mild; degraded =
3-5, then 3, 4 and 5 apart): outlier precision and recall against the mislabelled images, the ROC AUC
for telling them apart (threshold-free) of the rival margin the rule uses (every image's rival found:
`--all-rivals`) and of the similarity alone, and the merge candidates' precision and recall against the
identities filed twice; the mean and the worst over the seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from fiqa_curator.demo_kit.identity_noise import SEVERITY_GROUPS, check
from fiqa_curator.flows.identities import find_identities


def _summary(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    return f"{np.mean(values):.3f} (worst {min(values):.3f})" if values else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", default="fiqa-output/demo", help="the folder `fiqa demo` wrote")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    demo = Path(args.demo)
    quality, data = demo / "quality", demo / "data"
    if not (quality / "_SUCCESS").exists() or not (data / "fr_embeddings.parquet").exists():
        raise SystemExit(f"{demo}: no sample set and quality table: run ./scripts/demo first")
    with open(data / "manifest.csv", newline="") as handle:
        severity = {row["image_id"]: int(row["severity"]) for row in csv.DictReader(handle)}
    runs = []
    with tempfile.TemporaryDirectory(prefix="fiqa-validate-") as work:
        for seed in args.seeds:
            runs.append(
                check(
                    quality,
                    data / "fr_embeddings.parquet",
                    severity,
                    Path(work) / "out",
                    find_identities,
                    seed=seed,
                )
            )
    print(f"{runs[0]['images']} images, {runs[0]['swapped']} mislabelled per seed, seeds {args.seeds}")
    for weighting in ("weighted", "unweighted"):
        print(f"\n{weighting}:")
        print(
            f"  {'group':<11} {'precision':>22} {'recall':>22} {'AUC of the margin':>22} "
            f"{'AUC of the similarity':>22}"
        )
        for group in SEVERITY_GROUPS:
            precision = [run[weighting]["outliers"][group]["precision"] for run in runs]
            recall = [run[weighting]["outliers"][group]["recall"] for run in runs]
            margin = [run[weighting]["margin_auc"][group] for run in runs]
            auc = [run[weighting]["auc"][group] for run in runs]
            print(
                f"  {group:<11} {_summary(precision):>22} {_summary(recall):>22} {_summary(margin):>22} "
                f"{_summary(auc):>22}"
            )
        merges = [run[weighting]["merges"] for run in runs]
        print(
            f"  merges: precision {_summary([m['precision'] for m in merges])}, "
            f"recall {_summary([m['recall'] for m in merges])}"
        )
        thresholds = [run[weighting]["thresholds"] for run in runs]
        print(
            "  thresholds: "
            + ", ".join(
                f"{k} {np.mean([t[k] for t in thresholds]):.4f}"
                if all(t.get(k) is not None for t in thresholds)
                else f"{k} off"
                for k in ("outlier", "margin", "stranger", "duplicate", "merge")
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
