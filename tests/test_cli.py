"""The `fiqa` command line, run as a user runs it (the installed console script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fiqa_curator.workers import QualityScorer, decode_face, load_model
from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT
from tests.conftest import read_quality_table

FIQA = str(Path(sys.executable).parent / "fiqa")


def run(*args: str) -> subprocess.CompletedProcess:
    # the timeout is a hang guard only (the demo takes ~90 s on an idle 2-core machine)
    return subprocess.run(
        [FIQA, *args], capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"}
    )


def test_help_lists_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "score", "inspect", "check-reference"):
        assert command in result.stdout
    score_help = run("score", "--help").stdout
    for flag in (
        "--checkpoint",
        "--model-config",
        "--arch",
        "--mode",
        "--exit-depth",
        "--fusion",
        "--batch-size",
        "--shard-size",
        "--workers",
        "--device",
        "--overwrite",
        "--storage-options",
        "AWS_ENDPOINT_URL",
    ):
        assert flag in score_help


@pytest.mark.slow
def test_demo_scores_the_sample_faces_with_the_demo_model(tmp_path: Path) -> None:
    """The README's first command, on a smaller sample (4 held-out faces): real pipeline, demo model,
    clean faces separated from heavily degraded ones, raw photos aligned, and a rerun resumes."""
    output = tmp_path / "demo"
    result = run("demo", "--output", str(output), "--faces", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DEMO model" in result.stdout and "not for production" in result.stdout
    assert "done: 224 images (ok 224)" in result.stdout  # 4 faces x (clean + 11 kinds x 5 severities)
    rows = read_quality_table(str(output / "quality"))
    assert len(rows) == 224 and all(len(row["exit_scores"]) == 12 for row in rows.values())
    assert "a clean face outscores a heavily degraded one in" in result.stdout
    share = float(result.stdout.split("heavily degraded one in")[1].split("%")[0])
    assert share >= 80.0, result.stdout  # 4 clean vs 44 heavy images; a model that knew nothing: near 50%

    # the table's numbers are the API's numbers for the same files and the bundled checkpoint
    loaded = load_model(BUNDLED_CHECKPOINT)
    assert {row["model_sha256"] for row in rows.values()} == {loaded.sha256}
    some = sorted(rows)[::20]
    images = np.stack(
        [decode_face((output / "data" / "images" / image_id).read_bytes()).image for image_id in some]
    )
    expected = QualityScorer(loaded, device="cpu").score(images)
    np.testing.assert_allclose([rows[i]["quality"] for i in some], expected.fused["fw"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        [rows[i]["exit_scores"] for i in some], expected.exit_scores, rtol=1e-5, atol=1e-6
    )

    raw = read_quality_table(str(output / "raw-quality"))
    assert raw["broken_truncated.jpg"]["status"] == "decode_error"
    assert {raw[f"no_face_{i}.png"]["status"] for i in range(3)} == {"no_face"}
    assert {"two_faces.jpg#face0", "two_faces.jpg#face1", "grace_hopper.jpg#face0"} <= set(raw)
    page = (output / "quality" / "report" / "index.html").read_text()
    assert (
        'id="evaluation"' in page and 'id="advisor"' in page
    )  # EDC against dlib's recogniser, in the report
    assert "evaluation (EDC against dlib's face recogniser" in result.stdout
    raw_page = (output / "raw-quality" / "report" / "index.html").read_text()
    assert "two_faces.jpg#face1" in raw_page and "no preview" not in raw_page  # previews re-aligned

    again = run("demo", "--output", str(output), "--faces", "4")
    assert again.returncode == 0 and "scored now: 0 in 0 shard(s)" in again.stdout  # resumed, not recomputed


def test_check_reference_passes_and_detects_a_mismatch(reference_root: Path, tmp_path: Path) -> None:
    good = run("check-reference", str(reference_root))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "MISMATCH" not in good.stdout and good.stdout.count("match") >= 3

    tampered = tmp_path / "tampered"
    source = sorted(p.parent for p in reference_root.glob("*/model.pt"))[0]
    shutil.copytree(source, tampered)
    expected = np.load(tampered / "expected_quality.npy")
    (tampered / "expected_quality.npy").chmod(0o644)
    np.save(tampered / "expected_quality.npy", expected + 1e-3)
    bad = run("check-reference", str(tampered))
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout


def test_inspect_and_clear_errors(reference_root: Path, tmp_path: Path) -> None:
    checkpoint = sorted(reference_root.glob("*/model.pt"))[0]
    result = run("inspect", str(checkpoint))
    assert result.returncode == 0 and '"sha256"' in result.stdout and '"gflops_per_image"' in result.stdout
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"nope")
    result = run("inspect", str(broken), "--arch", "vit_s_qs")
    assert (
        result.returncode == 2
        and "error:" in result.stdout
        and "not a readable torch checkpoint" in result.stdout
    )
    result = run("inspect", str(checkpoint), "--arch", "vit_s_qs")
    assert result.returncode == 2 and "embed_dim: config says 512" in result.stdout
