"""Reading-stage CPU cost of `--decode device` against `--decode cpu`, interleaved in one run.

The reading stage decodes every 112x112 JPEG crop with Pillow (`--decode cpu`), or only checks its header
and passes the bytes on (`--decode device`, the scoring actor decodes). Both timed through the real
`read_and_decode` on the same files, one process, one core; plus torchvision's libjpeg batch decode (the
CPU stand-in of nvJPEG) for scale, and the bytes that cross the object store per row either way. From the
per-core rates: how many reading cores it takes to feed 20,000 images/s (the GPU goal).

    python benchmarks/bench_decode.py [--images 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from workers.device_decode import decode_jpegs
from workers.reading import read_and_decode

GOAL = 20_000  # images/s per H200-class GPU at full depth


def _crops(count: int, folder: Path) -> dict[str, np.ndarray]:
    """Face-like 112x112 JPEGs (smooth content, quality 90: ~4-5 KB like real aligned crops)."""
    rng = np.random.default_rng(0)
    urls = []
    for index in range(count):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        path = folder / f"{index:06d}.jpg"
        Image.fromarray(small).resize((112, 112), Image.Resampling.BILINEAR).save(path, format="JPEG", quality=90)
        urls.append(str(path))
    return {"image_id": np.array([Path(u).name for u in urls], dtype=object), "url": np.array(urls, dtype=object),
            "offset": np.full(count, -1), "length": np.full(count, -1)}


def _rate(action, count: int) -> float:
    started = time.perf_counter()
    action()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        batch = _crops(args.images, Path(workdir))
        blobs = [Path(url).read_bytes() for url in batch["url"]]
        read_and_decode(dict(batch))  # page cache and imports, outside the timing
        rates: dict[str, list[float]] = {"decode cpu": [], "decode device (header only)": [], "torchvision": []}
        for _ in range(args.repeats):  # interleaved: drift on a noisy machine hits every variant alike
            rates["decode cpu"].append(_rate(lambda: read_and_decode(dict(batch)), args.images))
            rates["decode device (header only)"].append(
                _rate(lambda: read_and_decode(dict(batch), defer_jpeg=True), args.images))
            rates["torchvision"].append(_rate(lambda: decode_jpegs(blobs, "cpu"), args.images))
        deferred = read_and_decode(dict(batch), defer_jpeg=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"# {args.images} JPEG crops 112x112 (mean {np.mean([len(b) for b in blobs]) / 1024:.1f} KB), "
          f"median of {args.repeats} interleaved rounds, one core; {platform.machine()}, "
          f"Python {platform.python_version()}")
    print("| reading stage | images/s per core | cores to feed 20,000 images/s |")
    print("|---|---|---|")
    for name in ("decode cpu", "decode device (header only)"):
        print(f"| {name} | {medians[name]:,.0f} | {GOAL / medians[name]:.1f} |")
    print(f"\nreading with --decode device / --decode cpu: {medians['decode device (header only)'] / medians['decode cpu']:.2f}x")
    print(f"torchvision libjpeg batch decode (the CPU stand-in of nvJPEG): {medians['torchvision']:,.0f} images/s")
    pixels = 112 * 112 * 3
    encoded = float(np.mean([len(b) for b in deferred["encoded"]]))
    print(f"bytes per row into the object store: pixels {pixels:,} (--decode cpu) vs pixels {pixels:,} + "
          f"encoded {encoded:,.0f} (--decode device: the pixel column stays, zero-filled)")


if __name__ == "__main__":
    main()
