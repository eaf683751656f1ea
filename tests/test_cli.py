"""The `fiqa` command line, run as a user runs it (the installed console script)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workers import QualityScorer, decode_face, load_model

FIQA = str(Path(sys.executable).parent / "fiqa")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FIQA, *args], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_help_lists_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "inspect", "check-reference"):
        assert command in result.stdout


@pytest.mark.slow
def test_demo_runs_the_real_path_and_says_it_is_a_stand_in(tmp_path: Path) -> None:
    output = tmp_path / "demo"
    result = run("demo", "--output", str(output), "--images", "12", "--exit-depth", "6")
    assert result.returncode == 0, result.stderr
    assert "RANDOMLY INITIALISED" in result.stdout and "carry no meaning" in result.stdout
    with open(output / "scores.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 14  # 12 images + 2 broken files, none dropped
    statuses = {row["image_id"]: row["status"] for row in rows}
    assert statuses["broken_truncated.jpg"] == statuses["notes_not_an_image.png"] == "decode_error"
    assert sum(status == "ok" for status in statuses.values()) == 12
    assert "exit_6" in rows[0] and "exit_7" not in rows[0]

    # the table's numbers are the API's numbers for the same files and the same checkpoint
    scorer = QualityScorer(load_model(output / "model" / "model.pt"), device="cpu")
    good = [row for row in rows if row["status"] == "ok"]
    images = np.stack([decode_face((output / "images" / row["image_id"]).read_bytes()).image for row in good])
    expected = scorer.score(images, exit_depth=6)
    np.testing.assert_allclose([float(row["quality_fw"]) for row in good], expected.fused["fw"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(row["exit_1"]) for row in good], expected.exit_scores[:, 0], rtol=1e-5, atol=1e-6)


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
    assert result.returncode == 2 and "error:" in result.stdout and "not a readable torch checkpoint" in result.stdout
    result = run("inspect", str(checkpoint), "--arch", "vit_s_qs")
    assert result.returncode == 2 and "embed_dim: config says 512" in result.stdout
