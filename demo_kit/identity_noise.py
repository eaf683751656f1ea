"""Known label noise on the sample dataset, to check `fiqa identities` against the truth.

`add_label_noise` gives a seeded share of the images another identity's label (mislabelled images) and
files a few identities twice (half of their images under a new name, `<name>__alias`). `check` runs
`fiqa identities` on a copy of a quality table carrying those labels, with and without quality weights,
and measures, per group of degradation severity: precision and recall of the outliers (against the
mislabelled images), the ROC AUC of the similarity and of the rival margin for telling mislabelled from
correctly labelled images (threshold-free), and precision and recall of the merge candidates (against the
identities filed twice).
`benchmarks/validate_identities.py` prints it for the whole sample set; a test recomputes a smaller one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ALIAS = "__alias"
# severity 0 is the clean image; 1 and 2 are mild, 3 to 5 heavier (demo_kit.degrade)
SEVERITY_GROUPS = {
    "clean": (0,),
    "clean+s1": (0, 1),
    "mild": (1, 2),
    "clean+mild": (0, 1, 2),
    "degraded": (3, 4, 5),
    # the degraded ones severity by severity: how the figures fall as the faces get worse (EDC-style)
    "s3": (3,),
    "s4": (4,),
    "s5": (5,),
}


@dataclass
class LabelNoise:
    labels: list[str]  # every image's new identity label
    swapped: np.ndarray  # bool per image: labelled as someone else
    aliases: dict[str, str]  # new name -> the identity it duplicates


def add_label_noise(
    identities: Sequence[str], *, swap_share: float = 0.05, split: int = 3, seed: int = 0
) -> LabelNoise:
    rng = np.random.default_rng(seed)
    original = np.asarray(identities, dtype=object)
    names = sorted(set(original.tolist()))
    labels = original.copy()
    aliases = {}
    for name in sorted(rng.choice(names, size=min(split, len(names)), replace=False).tolist()):
        members = np.flatnonzero(original == name)
        moved = rng.choice(members, size=len(members) // 2, replace=False)
        labels[moved] = name + ALIAS
        aliases[name + ALIAS] = name
    swapped = np.zeros(len(original), dtype=bool)
    for row in rng.choice(len(original), size=round(swap_share * len(original)), replace=False):
        others = [name for name in names if name != original[row]]
        labels[row] = others[rng.integers(len(others))]
        swapped[row] = True
    return LabelNoise(labels=labels.tolist(), swapped=swapped, aliases=aliases)


def relabelled_output(source: Path, target: Path, noise_by_id: Mapping[str, str]) -> Path:
    """A copy of the quality table at `source` (a fiqa OUTPUT) whose identities are `noise_by_id`'s."""
    if target.exists():
        shutil.rmtree(target)
    (target / "scores").mkdir(parents=True)
    for shard in sorted((source / "scores").glob("*.parquet")):
        table = pq.read_table(shard)
        labels = [noise_by_id[i] for i in table.column("image_id").to_pylist()]
        column = table.schema.get_field_index("identity")
        table = table.set_column(column, table.schema.field(column), pa.array(labels, pa.string()))
        pq.write_table(table, target / "scores" / shard.name)
    (target / "_SUCCESS").write_bytes(b"")
    return target


def _precision_recall(flagged: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    hits = int((flagged & truth).sum())
    return {
        "precision": hits / int(flagged.sum()) if flagged.any() else float("nan"),
        "recall": hits / int(truth.sum()) if truth.any() else float("nan"),
        "flagged": int(flagged.sum()),
        "truth": int(truth.sum()),
    }


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """How often a positive scores above a negative (ties count half); NaN without both."""
    from scipy.stats import rankdata

    score = np.asarray(score, dtype=np.float64)
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))  # ties get their average rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def measure(
    output: Path, noise: LabelNoise, image_ids: Sequence[str], severity: Mapping[str, int]
) -> dict[str, Any]:
    """Figures of one `fiqa identities` result in `output` against `noise` (in `image_ids` order)."""
    images = pq.read_table(output / "curation" / "identity_images.parquet").to_pydict()
    position = {image_id: k for k, image_id in enumerate(images["image_id"])}
    rows = np.array([position[i] for i in image_ids])
    outlier = np.asarray(images["outlier"], dtype=bool)[rows]
    similarity = np.array([np.nan if s is None else s for s in images["similarity"]], dtype=np.float64)[rows]
    levels = np.array([severity[i] for i in image_ids])
    figures: dict[str, Any] = {"outliers": {}, "auc": {}}
    for group, members in SEVERITY_GROUPS.items():
        inside = np.isin(levels, members)
        figures["outliers"][group] = _precision_recall(outlier[inside], noise.swapped[inside])
        judged = inside & np.isfinite(similarity)
        figures["auc"][group] = roc_auc(-similarity[judged], noise.swapped[judged])
    identities = pq.read_table(output / "curation" / "identities.parquet").to_pydict()
    truth = {alias: name for alias, name in noise.aliases.items()} | {n: a for a, n in noise.aliases.items()}
    candidate = np.asarray(identities["merge_candidate"], dtype=bool)
    partner_right = np.array(
        [
            truth.get(name) == nearest
            for name, nearest in zip(identities["identity"], identities["nearest_identity"], strict=True)
        ]
    )
    in_truth = np.array([name in truth for name in identities["identity"]])
    hits = int((candidate & partner_right).sum())
    figures["merges"] = {
        "precision": hits / int(candidate.sum()) if candidate.any() else float("nan"),
        "recall": hits / int(in_truth.sum()) if in_truth.any() else float("nan"),
        "flagged": int(candidate.sum()),
        "truth": int(in_truth.sum()),
    }
    summary = json.loads((output / "curation" / "identities.json").read_text())
    figures["thresholds"] = {
        k: summary["thresholds"][k] for k in ("outlier", "margin", "stranger", "duplicate", "merge")
    }
    figures["duplicates"] = summary["duplicates"]
    return figures


def margin_auc(
    output: Path, noise: LabelNoise, image_ids: Sequence[str], severity: Mapping[str, int]
) -> dict[str, float]:
    """Per severity group, the ROC AUC of the rival margin (similarity minus rival_similarity) for telling
    mislabelled images apart, from a result in `output` where every image was judged against its rival
    (`fiqa identities --all-rivals`)."""
    images = pq.read_table(output / "curation" / "identity_images.parquet").to_pydict()
    position = {image_id: k for k, image_id in enumerate(images["image_id"])}
    rows = np.array([position[i] for i in image_ids])

    def floats(name: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in images[name]], dtype=np.float64)[rows]

    margin = floats("similarity") - floats("rival_similarity")
    levels = np.array([severity[i] for i in image_ids])
    figures = {}
    for group, members in SEVERITY_GROUPS.items():
        judged = np.isin(levels, members) & np.isfinite(margin)
        figures[group] = roc_auc(-margin[judged], noise.swapped[judged])
    return figures


def check(
    quality: Path,
    embeddings: Path,
    severity: Mapping[str, int],
    work: Path,
    find_identities: Callable[..., Any],
    *,
    swap_share: float = 0.05,
    split: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Noise on `quality`'s labels, then `find_identities` (`flows.identities.find_identities`, passed
    in: the demo kit sits below the flows) with and without quality weights: the figures of both
    (`measure`, and `margin_auc` under "margin_auc": every image's rival is found), keyed "weighted" and
    "unweighted"."""
    table = pq.read_table(quality / "scores", columns=["image_id", "identity"]).to_pydict()
    noise = add_label_noise(table["identity"], swap_share=swap_share, split=split, seed=seed)
    output = relabelled_output(quality, work, dict(zip(table["image_id"], noise.labels, strict=True)))
    result: dict[str, Any] = {"images": len(noise.labels), "swapped": int(noise.swapped.sum()), "seed": seed}
    result["aliases"] = sorted(noise.aliases)
    for name, weighted in (("weighted", True), ("unweighted", False)):
        find_identities(str(output), embeddings=str(embeddings), weighted=weighted, all_rivals=True)
        result[name] = measure(output, noise, table["image_id"], severity)
        result[name]["margin_auc"] = margin_auc(output, noise, table["image_id"], severity)
    return result
