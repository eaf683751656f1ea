"""Reading-stage cost of `--align`: decode + detect + landmarks + warp, against decode + resize, on the
same raw photographs, interleaved in one run; plus the demo model's scoring rate for scale.

Photos: the sample dataset's portraits and two-face collage (512x512 to 1100x620), repeated. Each
figure is the median of --repeats interleaved rounds.

    python benchmarks/bench_align.py [--photos 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time

import numpy as np
from PIL import Image

from fiqa_curator.demo_kit.faces import _astronaut, _grace_hopper
from fiqa_curator.workers.align import detect_faces, warp_to_template
from fiqa_curator.workers.preprocess import decode_face, decode_image


def _photos(count: int) -> list[bytes]:
    grace, astronaut = _grace_hopper()[0], _astronaut()[0]
    collage = np.full((620, 1100, 3), 255, np.uint8)
    collage[10:610, 10:522] = grace
    collage[40:552, 570:1082] = astronaut
    encoded = []
    for image in (grace, astronaut, collage):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return [encoded[i % 3] for i in range(count)]


def _resize_only(data: list[bytes]) -> None:
    for item in data:
        decode_face(item)


def _align(data: list[bytes]) -> None:
    for item in data:
        decoded = decode_image(item)
        for face in detect_faces(decoded.image):
            warp_to_template(decoded.image, face.landmarks)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = _photos(args.photos)
    _align(data[:3])  # load the dlib models once, outside the timing
    from fiqa_curator.workers import QualityScorer, load_model
    from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT

    scorer = QualityScorer(load_model(BUNDLED_CHECKPOINT), device="cpu", batch_size=64)
    crops = np.random.default_rng(0).integers(0, 256, (64, 112, 112, 3), dtype=np.uint8)
    scorer.score(crops)
    rounds = {"decode + resize": [], "decode + align (all faces)": [], "demo model, 64 crops": []}
    for _ in range(args.repeats):
        for name, job, count in (
            ("decode + resize", lambda: _resize_only(data), len(data)),
            ("decode + align (all faces)", lambda: _align(data), len(data)),
            ("demo model, 64 crops", lambda: scorer.score(crops), len(crops)),
        ):
            started = time.perf_counter()
            job()
            rounds[name].append(count / (time.perf_counter() - started))
    import torch

    print(
        f"{args.photos} photos (512x512, 512x600, 1100x620 JPEG); python {platform.python_version()}, "
        f"torch {torch.__version__} {torch.get_num_threads()} threads; median of {args.repeats}"
    )
    base = statistics.median(rounds["decode + resize"])
    for name, values in rounds.items():
        rate = statistics.median(values)
        print(
            f"{name:28s} {rate:8.1f} images/s"
            + (f"   ({rate / base:.3f}x decode + resize)" if "model" not in name else "")
        )


if __name__ == "__main__":
    main()
