"""GPU code paths, checked on the CPU where they can be: actor placement from a cluster's resources (a
GPU cluster is described, not run: none is here) and the prepared GPU check script, dry-run on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fiqa_curator.flows.cluster import actor_placement
from fiqa_curator.schemas.errors import UserError
from tests.conftest import REPO_ROOT


def test_one_actor_per_gpu_by_default_and_fractions_share_a_gpu() -> None:
    eight = {"CPU": 128.0, "GPU": 8.0}
    assert actor_placement(eight) == actor_placement(eight, device="cuda")
    placement = actor_placement(eight)
    assert (
        placement.gpu
        and placement.workers == 8
        and placement.gpus_per_worker == 1.0
        and placement.threads is None
    )
    half = actor_placement(eight, gpus_per_worker=0.5)
    assert half.workers == 16 and half.gpus_per_worker == 0.5
    assert actor_placement(eight, gpus_per_worker=0.25, workers=3).workers == 3
    assert actor_placement({"CPU": 8.0, "GPU": 1.0}, gpus_per_worker=0.3).workers == 3


def test_cpu_placement_and_refusals() -> None:
    cpu = actor_placement({"CPU": 16.0, "GPU": 4.0}, device="cpu", workers=4)
    assert not cpu.gpu and cpu.workers == 4 and cpu.threads == 4 and cpu.gpus_per_worker == 0
    assert actor_placement({"CPU": 2.0}).threads == 2
    with pytest.raises(UserError, match="no GPU"):
        actor_placement({"CPU": 2.0}, device="cuda")
    for bad in (0, -1, 1.5):
        with pytest.raises(UserError, match="gpus-per-worker"):
            actor_placement({"CPU": 2.0, "GPU": 1.0}, gpus_per_worker=bad)


@pytest.mark.slow
def test_gpu_check_script_runs_dry_on_the_cpu(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent), prepend=":")
    import gpu_check

    report = gpu_check.main(
        [
            "--device",
            "cpu",
            "--images",
            "48",
            "--quick",
            "--exits",
            "4,12",
            "--json",
            str(tmp_path / "gpu.json"),
        ]
    )
    assert report["parity"]["fp32_ok"] and report["parity"]["fp32_max_abs_diff"] == 0.0
    assert set(report["model_stage"]) == {4, 12} and report["model_stage"][4]["images_per_second"] > 0
    assert report["model_stage"][12]["auto_batch_size"] == 64  # the CPU batch; on CUDA the memory probe's
    decode = report["decode"]
    assert decode["images"] == 48 and decode["device_refused"] == 0 and decode["pixel_max_abs_diff"] == 0
    assert decode["score_max_abs_diff"] == 0.0 and decode["device_images_per_second"] > 0
    assert decode["pixel_max_abs_diff_444"] == 0 and decode["score_max_abs_diff_444"] == 0.0
    assert "scores_max_abs_diff_between_decoders" in report["end_to_end"]
    for place, run in report["end_to_end"].items():
        if place == "scores_max_abs_diff_between_decoders":
            assert run == 0.0  # the same pixels (libjpeg on both paths here), so the same scores
            continue
        assert run.get("images") == 48 and run["counts"] == {"ok": 48}, run
        assert run["decoded_on_device"] == (48 if place == "device" else 0) and run["precision"] == "fp32"
    assert json.loads((tmp_path / "gpu.json").read_text())["device"] == "cpu"


def test_fp32_on_a_gpu_turns_tf32_off_for_the_forward_pass_only() -> None:
    """PyTorch lets cuDNN run fp32 convolutions in TF32; on an H200 that moved fp32 scores 2.2e-4 from the
    CPU's. The scorer's fp32 forward pass asks for IEEE fp32 and gives the caller's settings back, also
    when the pass fails."""
    import torch

    from fiqa_curator.workers.scoring import QualityScorer

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    assert "ieee" not in before  # PyTorch's defaults ("tf32" for cuDNN convolutions)
    with QualityScorer._ieee_fp32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(RuntimeError, match="boom"), QualityScorer._ieee_fp32():
        raise RuntimeError("boom")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
