"""The GPU checks and benchmarks of the nightly-operations issue, in one prepared run (a few minutes).

    python benchmarks/gpu_check.py --json gpu.json                 # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --images 64 --quick  # a dry run anywhere (the tests do this)

1. parity: a seeded ViT-S-sized ViT-FIQA (token, dim 512, depth 12, heads 8) scores the same images on the
   CPU in fp32 and on the device in fp32 and in bf16 autocast; reports the max |diff| of every exit and the
   Spearman correlation of the bf16 scores with the fp32 ones. Tolerances: fp32 atol 1e-4; bf16 max |diff|
   below 5% of the scores' spread and Spearman >= 0.99 (bf16 keeps 8 bits of mantissa);
2. model-stage throughput at exits 4, 8, 12: images/s of `QualityScorer` on uint8 batches already in host
   memory (host-to-device copy included), for a sweep of batch sizes and the batch the memory probe picks
   (`batch_size="auto"`), and the share of the device's bf16 dense peak (--peak-tflops; H200: 989) that the
   best batch reaches;
3. JPEG decoding: Pillow on one CPU core vs `decode_jpegs` on the device (nvJPEG, batched), images/s; the
   pixel differences between the two and what they do to the scores (fp32, so only decoding differs);
4. end-to-end: `fiqa score` (the real pipeline: Prefect, Ray Data, Parquet) on packed WebDataset shards of
   JPEGs at exit 12, decoding on the CPU and on the device, images/s and the ratio to the model stage.
The goal on an H200-class GPU is 20,000 images/s at full depth. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fiqa_curator.schemas.layout import SCORES
from fiqa_curator.workers import QualityScorer, ViTFIQA, ViTFIQAConfig
from fiqa_curator.workers.checkpoint import LoadedModel, save_checkpoint
from fiqa_curator.workers.device_decode import decode_jpegs
from fiqa_curator.workers.preprocess import decode_face

CONFIG = ViTFIQAConfig(mode="token", embed_dim=512, depth=12, num_heads=8)


def _loaded(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = ViTFIQA(CONFIG).eval()
    return LoadedModel(model=model, config=CONFIG, source="gpu_check", sha256="-", ignored_keys=())


def synthetic_faces(count: int, seed: int = 0) -> np.ndarray:
    """Smooth 112x112 RGB images (14x14 noise upsampled): not faces, but JPEG-compressible like aligned
    crops."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (count, 14, 14, 3), dtype=np.uint8)  # smooth-ish images, not pure noise
    return np.stack(
        [np.asarray(Image.fromarray(b).resize((112, 112), Image.Resampling.BILINEAR)) for b in base]
    )


def parity(device: str, images: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    reference = QualityScorer(_loaded(), device="cpu", precision="fp32").score(images).exit_scores
    fp32 = QualityScorer(_loaded(), device=device, precision="fp32").score(images).exit_scores
    out = {
        "fp32_max_abs_diff": float(np.abs(fp32 - reference).max()),
        "fp32_ok": bool(np.allclose(fp32, reference, atol=1e-4)),
    }
    if device.startswith("cuda"):
        bf16 = QualityScorer(_loaded(), device=device, precision="bf16").score(images).exit_scores
        spread = float(reference.std())
        rho = min(float(spearmanr(bf16[:, e], reference[:, e]).statistic) for e in range(reference.shape[1]))
        diff = float(np.abs(bf16 - reference).max())
        out.update(
            bf16_max_abs_diff=diff,
            score_spread=spread,
            bf16_min_spearman=rho,
            bf16_ok=bool(diff < 0.05 * spread and rho >= 0.99),
        )
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(device: str, images: np.ndarray, exits: list[int], batches: list[int], repeats: int) -> dict:
    scorer = QualityScorer(_loaded(), device=device, batch_size="auto")
    auto = scorer.batch_size  # what the memory probe chose (CPU: the fixed CPU batch)
    batches = sorted({*batches, auto})
    results = {}
    for exit_depth in exits:
        best = 0.0
        per_batch = {}
        for batch in batches:
            scorer.batch_size = batch
            chunk = images[: max(batch, min(len(images), batch * 4))]
            scorer.score(chunk[:batch], exit_depth=exit_depth)  # warm-up (kernels, allocator)
            _sync(device)
            rates = []
            for _ in range(repeats):
                started = time.perf_counter()
                scorer.score(chunk, exit_depth=exit_depth)
                _sync(device)
                rates.append(len(chunk) / (time.perf_counter() - started))
            per_batch[batch] = float(np.median(rates))
            best = max(best, per_batch[batch])
        results[exit_depth] = {
            "images_per_second": best,
            "by_batch": per_batch,
            "auto_batch_size": auto,
            "gflops_per_image": CONFIG.flops_at_exit(exit_depth) / 1e9,
        }
    return results


def jpeg_bytes(images: np.ndarray, subsampling: str = "4:2:0") -> list[bytes]:
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90, subsampling=subsampling)
        blobs.append(buffer.getvalue())
    return blobs


def decoding(device: str, images: np.ndarray, repeats: int) -> dict:
    blobs = jpeg_bytes(images)
    started = time.perf_counter()
    on_cpu = np.stack([decode_face(blob).image for blob in blobs])
    cpu_rate = len(blobs) / (time.perf_counter() - started)
    decode_jpegs(blobs[:64], device)  # warm-up: nvJPEG handles, allocator
    _sync(device)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        on_device = decode_jpegs(blobs, device)
        _sync(device)
        rates.append(len(blobs) / (time.perf_counter() - started))
    refused = sum(image is None for image in on_device)
    device_pixels = np.stack(
        [
            (image.cpu().numpy() if image is not None else cpu)
            for image, cpu in zip(on_device, on_cpu, strict=True)
        ]
    )
    pixel_diff = np.abs(device_pixels.astype(np.int16) - on_cpu.astype(np.int16))
    scorer = QualityScorer(_loaded(), device=device, precision="fp32")
    count = min(len(images), 2048)
    from_cpu = scorer.score(on_cpu[:count]).exit_scores
    from_device = scorer.score(device_pixels[:count]).exit_scores
    # Full-resolution chroma (4:4:4) takes chroma upsampling out: what differs then is the IDCT and the
    # colour conversion alone.
    full_chroma = jpeg_bytes(images[:count], subsampling="4:4:4")
    cpu_444 = np.stack([decode_face(blob).image for blob in full_chroma])
    device_444 = np.stack([image.cpu().numpy() for image in decode_jpegs(full_chroma, device)])
    diff_444 = np.abs(device_444.astype(np.int16) - cpu_444.astype(np.int16))
    return {
        "images": len(blobs),
        "cpu_images_per_second_one_core": cpu_rate,
        "device_images_per_second": float(np.median(rates)),
        "device_refused": refused,
        "pixel_max_abs_diff": int(pixel_diff.max()),
        "pixel_mean_abs_diff": float(pixel_diff.mean()),
        "score_max_abs_diff": float(np.abs(from_device - from_cpu).max()),
        "score_spread": float(from_cpu.std()),
        "pixel_max_abs_diff_444": int(diff_444.max()),
        "pixel_mean_abs_diff_444": float(diff_444.mean()),
        "score_max_abs_diff_444": float(
            np.abs(scorer.score(device_444).exit_scores - scorer.score(cpu_444).exit_scores).max()
        ),
    }


def _shards(folder: Path, images: np.ndarray, per_shard: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(images), per_shard):
        with tarfile.open(folder / f"shard-{start // per_shard:05d}.tar", "w") as tar:
            for index in range(start, min(len(images), start + per_shard)):
                # 4:4:4: the chroma that `--decode device` decodes on the GPU (4:2:0 stays on the CPU)
                data = jpeg_bytes(images[index : index + 1], subsampling="4:4:4")[0]
                info = tarfile.TarInfo(f"{index:08d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def end_to_end(device: str, images: np.ndarray, workdir: Path, decode: str) -> dict:
    model_dir = workdir / "model"
    if not model_dir.exists():
        model_dir.mkdir(parents=True)
        save_checkpoint(_loaded().model, model_dir / "model.pt")
        (model_dir / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    shards = workdir / "shards"
    if not shards.exists():
        _shards(shards, images, per_shard=1000)
    out = workdir / f"out-{decode}"
    started = time.perf_counter()
    run = subprocess.run(
        [
            # the module rather than the `fiqa` script: a GPU machine's image may run the sources from
            # PYTHONPATH with no installed entry point
            sys.executable,
            "-m",
            "fiqa_curator.flows.cli",
            "score",
            str(shards),
            str(out),
            "--checkpoint",
            str(model_dir / "model.pt"),
            "--model-config",
            str(model_dir / "config.json"),
            "--device",
            device.split(":")[0],
            "--decode",
            decode,
            "--shard-size",
            "5000",
            "--no-progress",
            "--no-report",
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        return {"error": run.stdout[-2000:] + run.stderr[-2000:]}
    record = json.loads((out / "_run.json").read_text())
    return {
        "images": len(images),
        "wall_seconds": seconds,
        "images_per_second": record["images_per_second"],
        "steady_images_per_second": record["stages"]["steady_images_per_second"],
        "first_batch_seconds": record["stages"]["first_batch_seconds"],
        "device": record["device"],
        "decoded_on_device": record["stages"]["decoded_on_device"],
        "driver_write_seconds": record["stages"]["write_seconds"],
        "block_rows": record["stages"]["block_rows"],
        "workers": record["workers"],
        "precision": record["config"]["precision"],
        "counts": record["counts"],
    }


def _max_score_difference(first: Path, second: Path) -> float:
    """Largest |difference| of any exit's score between two runs' quality tables, image by image."""
    import pyarrow.dataset as ds

    def scores(output: Path) -> np.ndarray:
        table = ds.dataset(output / SCORES, format="parquet").to_table(columns=["image_id", "exit_scores"])
        table = table.sort_by("image_id")
        return np.stack(table.column("exit_scores").to_numpy(zero_copy_only=False))

    return float(np.abs(scores(first) - scores(second)).max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=20000, help="images for the throughput runs")
    parser.add_argument(
        "--e2e-images",
        type=int,
        help="images for the end-to-end runs (default: --images); the distinct images repeat past --images",
    )
    parser.add_argument("--batches", default="256,512,1024,2048")
    parser.add_argument("--exits", default="4,8,12")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the device")
    parser.add_argument("--quick", action="store_true", help="small sizes: a dry run of the script itself")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = "16", 1
    images = synthetic_faces(args.images)
    report: dict = {
        "device": args.device,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }

    def section(name: str, measure: Callable[[], Any]) -> None:
        """One check: its figures, or the end of its traceback so that the checks after it still run (device
        time is scarce: one failed section must not cost the others); the JSON is rewritten after each."""
        try:
            report[name] = measure()
        except Exception:  # recorded in the report, and the exit status says so
            report[name] = {"error": traceback.format_exc()[-3000:]}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    section("parity", lambda: parity(args.device, images[:64]))
    section(
        "model_stage",
        lambda: throughput(
            args.device,
            images,
            [int(e) for e in args.exits.split(",")],
            [int(b) for b in args.batches.split(",")],
            args.repeats,
        ),
    )
    section("decode", lambda: decoding(args.device, images[: min(len(images), 8192)], args.repeats))
    full = report["model_stage"].get(CONFIG.depth, {})
    if "images_per_second" in full:
        report["bf16_peak_share_at_full_depth"] = (
            full["images_per_second"] * full["gflops_per_image"] / (args.peak_tflops * 1e3)
        )
    e2e_images = np.resize(images, (args.e2e_images or len(images), *images.shape[1:]))
    with tempfile.TemporaryDirectory() as workdir:

        def both_decoders() -> dict:
            places = ("cpu", "device")
            runs = {place: end_to_end(args.device, e2e_images, Path(workdir), place) for place in places}
            if not any("error" in run for run in runs.values()):
                runs["scores_max_abs_diff_between_decoders"] = _max_score_difference(
                    Path(workdir) / "out-cpu", Path(workdir) / "out-device"
                )
            return runs

        section("end_to_end", both_decoders)
    for run in report["end_to_end"].values():
        if isinstance(run, dict) and "images_per_second" in run and "images_per_second" in full:
            run["ratio_to_model_stage"] = run["images_per_second"] / full["images_per_second"]
            run["steady_ratio_to_model_stage"] = run["steady_images_per_second"] / full["images_per_second"]
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    figures = main()
    failed = [name for name, part in figures.items() if isinstance(part, dict) and "error" in part]
    failed += [
        f"end_to_end.{name}"
        for name, run in figures.get("end_to_end", {}).items()
        if isinstance(run, dict) and "error" in run
    ]
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
