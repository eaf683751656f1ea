"""The embedded default job: generated face-like images scored through the real pipeline by the bundled
stand-in model (a seeded, randomly initialised ViT-FIQA).

This is the stand-in until the demo kit (real sample faces and a trained demo model) lands: the pipeline,
checkpoint loading, decoding, early exits and fusion are the real ones, offline, in well under a minute;
the scores carry no meaning and the output says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFilter

from flows.score import RunSummary, ScoreOptions, score_flow
from workers import ViTFIQA, ViTFIQAConfig
from workers.checkpoint import save_checkpoint

STANDIN_CONFIG = ViTFIQAConfig(mode="token", embed_dim=32, depth=12, num_heads=4)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
NOTICE = (
    "DEMO STAND-IN: generated face-like images scored through the real pipeline (Prefect + Ray + Parquet) "
    "by a RANDOMLY INITIALISED ViT-FIQA (token mode, dim 32, depth 12). The scores carry no meaning; "
    "they show the code path, not quality."
)


def _face(rng: np.random.Generator, size: int = 112) -> Image.Image:
    """A crude synthetic face: skin ellipse, eyes, nose, mouth on a random background."""
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    skin = tuple(int(v) for v in rng.integers([150, 100, 80], [255, 200, 170]))
    draw.ellipse((22, 10, 90, 106), fill=skin)
    for x in (38, 73):  # eyes near the ArcFace template points
        draw.ellipse((x - 6, 46, x + 6, 56), fill=(255, 255, 255))
        draw.ellipse((x - 3, 48, x + 3, 54), fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
    draw.polygon([(56, 58), (51, 74), (61, 74)], fill=tuple(max(0, c - 40) for c in skin))
    draw.arc((40, 80, 72, 98), 15, 165, fill=(120, 30, 40), width=3)
    return image


def generate_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write `count` generated images in varied formats and conditions, plus two broken files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for index in range(count):
        image = _face(rng)
        kind = index % 6
        if kind == 1:
            image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 4))))
        elif kind == 2:
            noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 35, (112, 112, 3)).astype(np.int16)
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        elif kind == 3:
            image = image.resize((250, 250), Image.Resampling.BICUBIC)  # not a 112 crop: resized + flagged
        elif kind == 4:
            image = image.convert("L")
        extension, options = [(".png", {}), (".jpg", {"quality": 85}), (".webp", {"quality": 80})][index % 3]
        path = folder / f"face_{index:03d}{extension}"
        image.save(path, **options)
        paths.append(path)
    truncated = folder / "broken_truncated.jpg"
    truncated.write_bytes((folder / "face_001.jpg").read_bytes()[:200])
    not_an_image = folder / "notes_not_an_image.png"
    not_an_image.write_text("this file is text, not an image\n")
    return sorted([*paths, truncated, not_an_image])


def make_random_model(folder: Path, seed: int = 0) -> Path:
    """Save a seeded random demo model in the official checkpoint format, with its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ViTFIQA(STANDIN_CONFIG)
    with torch.no_grad():  # non-trivial head statistics so scores vary between images
        model.head_qs[0].running_var.fill_(1e-3)
    path = folder / "model.pt"
    save_checkpoint(model, path)
    (folder / "config.json").write_text(json.dumps(STANDIN_CONFIG.to_dict(), indent=1))
    return path


@dataclass
class DemoResult:
    output: Path
    rows: list[dict]
    summary: RunSummary


def run_demo(
    output: Path, *, count: int = 24, exit_depth: int | None = None, fusion: str = "fw",
    on_rows: Callable[[int], None] | None = None,
) -> DemoResult:
    """Generate the images if missing, then score them with the bundled model through the real pipeline.

    A rerun finds the same listing and configuration and resumes (nothing to recompute); a rerun with
    other options replaces the previous results."""
    images = output / "images"
    if not images.is_dir():
        generate_images(images, count)
    options = ScoreOptions(input=str(images), output=str(output / "quality"), exit_depth=exit_depth,
                           fusion=fusion, shard_size=10, overwrite=True)
    summary = score_flow(options, on_rows=on_rows)
    table = pq.read_table(output / "quality" / "scores")
    return DemoResult(output=output, rows=table.to_pylist(), summary=summary)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-standin"]:
        from workers.assets import BUNDLED_DIR

        print(make_random_model(BUNDLED_DIR))
