"""The demo kit: degradations, the FR utility target, the sample dataset builder, the demo model's
training determinism, and the committed demo model's quality on faces it never saw."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fiqa_curator.demo_kit.build import build_sample_set, degraded_set, split_faces, utility_of
from fiqa_curator.demo_kit.degrade import DEGRADATIONS, SEVERITIES, degrade
from fiqa_curator.demo_kit.faces import source_faces
from fiqa_curator.demo_kit.utility import fr_embeddings, references, utility
from fiqa_curator.workers import QualityScorer, load_model
from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT, BUNDLED_DIR


@pytest.fixture(scope="module")
def faces():
    return source_faces()


def test_sources_are_real_aligned_faces_with_provenance(faces) -> None:
    assert len(faces) == 102 and len({f.face_id for f in faces}) == 102
    assert all(f.aligned.shape == (112, 112, 3) and f.aligned.dtype == np.uint8 for f in faces)
    assert all(f.provenance and f.licence for f in faces)
    assert sum(f.alignment == "detected" for f in faces) >= 90  # the rest: landmarks in the known crop
    splits = split_faces(faces)
    assert sorted(splits.values()).count("test") == 15 and splits["grace_hopper"] == "test"
    assert split_faces(faces) == splits  # seeded


def test_degradations_are_seeded_graded_and_leave_the_clean_image_alone(faces) -> None:
    image = faces[1].aligned
    for kind in DEGRADATIONS:
        first = [degrade(image, kind, s, np.random.default_rng(7)) for s in SEVERITIES]
        again = [degrade(image, kind, s, np.random.default_rng(7)) for s in SEVERITIES]
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True)), kind
        assert all(d.shape == image.shape and d.dtype == np.uint8 for d in first)
        change = [np.abs(d.astype(float) - image).mean() for d in first]
        assert change[0] > 0.5, kind  # every kind does something even at severity 1
        assert change[-1] > change[0], (kind, change)  # and more at severity 5
    assert np.array_equal(degrade(image, "noise", 0, np.random.default_rng(0)), image)
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(image, "sepia", 1, np.random.default_rng(0))


def test_utility_is_the_identification_margin_and_falls_with_severity(faces) -> None:
    chosen = faces[:12]
    refs = references(np.stack([f.aligned for f in chosen]))
    clean = fr_embeddings(np.stack([f.aligned for f in chosen]))
    margins = utility(clean, np.arange(12), refs)
    # by hand, for one image: nearest other reference minus own reference
    distances = np.linalg.norm(clean[3] - refs, axis=1)
    assert margins[3] == pytest.approx(np.delete(distances, 3).min() - distances[3], abs=1e-5)
    assert (margins > 0).mean() >= 0.9  # clean faces are recognised against their own mirror images
    sample = degraded_set(chosen, kinds=("gaussian_blur", "occlusion"), severities=(1, 5), seed=3)
    target, _, _ = utility_of(sample, refs, np.arange(12))
    degradation, severity = np.array(sample.degradation), sample.severity
    for kind in ("gaussian_blur", "occlusion"):
        mild = target[(degradation == kind) & (severity == 1)]
        heavy = target[(degradation == kind) & (severity == 5)]
        assert np.median(heavy) < np.median(mild) - 0.1, kind
    # parallel and serial embedding agree
    serial = fr_embeddings(sample.images[:70], processes=1)
    np.testing.assert_allclose(fr_embeddings(sample.images[:70], processes=2, chunk=20), serial, atol=1e-6)


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_sample_set_builder_writes_a_deterministic_scorable_dataset(tmp_path: Path) -> None:
    kwargs = {"max_faces": 3, "severities": (1, 5), "kinds": ("noise", "rotation"), "log": lambda _: None}
    manifest = build_sample_set(tmp_path / "a", **kwargs)
    build_sample_set(tmp_path / "b", **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * (1 + 2 * 2)
    assert all((manifest.parent / row["uri"]).is_file() for row in rows)
    assert {row["split"] for row in rows} == {"test"}
    assert {(row["degradation"], row["severity"]) for row in rows} == {
        ("clean", "0"),
        ("noise", "1"),
        ("noise", "5"),
        ("rotation", "1"),
        ("rotation", "5"),
    }
    assert all(row["identity"] == row["face"] and row["provenance"] for row in rows)
    pairs = pq.read_table(manifest.parent / "pairs.parquet").to_pylist()
    assert len(pairs) == len(rows) * 3 - 3  # every image against every clean image but itself
    assert sum(p["genuine"] for p in pairs) == len(rows) - 3
    embeddings = pq.read_table(manifest.parent / "fr_embeddings.parquet")
    assert embeddings.num_rows == len(rows) and len(embeddings.column("embedding")[0]) == 128
    raw = sorted(p.name for p in (manifest.parent / "raw").iterdir())
    assert "two_faces.jpg" in raw and "broken_truncated.jpg" in raw and "no_face_0.png" in raw
    info = json.loads((manifest.parent / "dataset.json").read_text())
    assert info["images"] == len(rows) and info["faces"] == 3


def test_training_is_deterministic_given_the_seed(faces) -> None:
    from fiqa_curator.demo_kit.train import TrainSettings, train_model

    sample = degraded_set(faces[2:6], kinds=("noise",), severities=(1, 5), seed=0)
    targets = np.linspace(-0.1, 0.4, len(sample.images)).astype(np.float32)
    settings = TrainSettings(epochs=1, batch_size=4, max_steps=3, seed=5)
    first, losses = train_model(sample.images, targets, settings, log=lambda _: None)
    second, _ = train_model(sample.images, targets, settings, log=lambda _: None)
    other, _ = train_model(
        sample.images, targets, TrainSettings(epochs=1, batch_size=4, max_steps=3, seed=6), log=lambda _: None
    )
    state_a, state_b = first.state_dict(), second.state_dict()
    assert all(np.isfinite(losses))
    assert all(torch_equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch_equal(state_a[k], other.state_dict()[k]) for k in state_a)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_demo_model_is_committed_with_its_card() -> None:
    card = (BUNDLED_DIR / "MODEL_CARD.md").read_text()
    assert "not for production" in card and "python -m fiqa_curator.demo_kit.train" in card
    record = json.loads((BUNDLED_DIR / "training.json").read_text())
    loaded = load_model(BUNDLED_CHECKPOINT)
    assert loaded.sha256 == record["sha256"] and loaded.config.mode == "token"
    assert BUNDLED_CHECKPOINT.stat().st_size < 8 * 1024**2  # a few MB
    held_out = record["held_out"]
    assert held_out["spearman"]["fw"] >= 0.6 and held_out["faces"] == 15
    assert all(v["lowest_above_highest"] for v in held_out["per_degradation"].values())
    assert record["train_seconds"] + record["prepare_seconds"] < 20 * 60


@pytest.mark.slow
def test_demo_model_ranks_held_out_faces_by_utility(faces) -> None:
    """The acceptance figures, recomputed here on a smaller held-out set (6 faces, severities 1, 3, 5)."""
    splits = split_faces(faces)
    held_out = [f for f in faces if splits[f.face_id] == "test"][:6]
    refs = references(np.stack([f.aligned for f in faces]))
    sample = degraded_set(held_out, severities=(1, 3, 5), seed=11)
    target, _, _ = utility_of(sample, refs, np.array([faces.index(f) for f in held_out]))
    result = QualityScorer(load_model(BUNDLED_CHECKPOINT), device="cpu").score(sample.images)
    from scipy.stats import spearmanr

    assert spearmanr(result.fused["fw"], target).statistic >= 0.6
    degradation = np.array(sample.degradation)
    for kind in DEGRADATIONS:
        low = np.median(result.fused["fw"][(degradation == kind) & (sample.severity == 1)])
        high = np.median(result.fused["fw"][(degradation == kind) & (sample.severity == 5)])
        assert high < low, kind
    clean = result.fused["fw"][degradation == "clean"]
    heavy = result.fused["fw"][sample.severity == 5]
    assert np.median(clean) > np.quantile(heavy, 0.75)
