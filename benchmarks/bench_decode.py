"""Reading-stage cost: `--decode device` against `--decode cpu`, and tar-shard members read in spans
against one request per member, on local disk and on a real S3 server (SeaweedFS on loopback).

The reading stage decodes every 112x112 JPEG crop with Pillow (`--decode cpu`), or only checks its header
and passes the bytes on (`--decode device`, the scoring actor decodes). Both timed through the real
`read_and_decode` on the same files, one process, one core; plus torchvision's libjpeg batch decode (the
CPU stand-in of nvJPEG) for scale, and the bytes per row that cross the object store either way. From the
per-core rates: how many reading cores it takes to feed 20,000 images/s (the GPU goal).

Then the same crops packed in one WebDataset tar, read through `read_and_decode` as one batch: members
joined into spans (`reading.MAX_GAP`, the default) against one read per member (MAX_GAP = -1), from the
local file and from SeaweedFS, interleaved. Every variant is checked to give the same rows.

    python benchmarks/bench_decode.py [--images 2048] [--repeats 5] [--no-s3]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from gpu_check import jpeg_bytes, synthetic_faces  # benchmarks/ is on sys.path when run

import fiqa_curator.workers.reading
from fiqa_curator.workers.device_decode import decode_jpegs
from fiqa_curator.workers.reading import read_and_decode

GOAL = 20_000  # images/s per H200-class GPU at full depth


def _crops(count: int, folder: Path) -> dict[str, np.ndarray]:
    """The GPU check's synthetic crops as JPEG files (quality 90: ~4 KB, like real aligned crops)."""
    urls = []
    for index, blob in enumerate(jpeg_bytes(synthetic_faces(count))):
        path = folder / f"{index:06d}.jpg"
        path.write_bytes(blob)
        urls.append(str(path))
    return {
        "image_id": np.array([Path(u).name for u in urls], dtype=object),
        "url": np.array(urls, dtype=object),
        "offset": np.full(count, -1),
        "length": np.full(count, -1),
    }


def _rate(action, count: int) -> float:
    started = time.perf_counter()
    action()
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 part (needs the weed binary)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        batch = _crops(args.images, Path(workdir))
        blobs = [Path(url).read_bytes() for url in batch["url"]]
        read_and_decode(dict(batch))  # page cache and imports, outside the timing
        rates: dict[str, list[float]] = {
            "decode cpu": [],
            "decode device (header only)": [],
            "torchvision": [],
        }
        for _ in range(args.repeats):  # interleaved: drift on a noisy machine hits every variant alike
            rates["decode cpu"].append(_rate(lambda: read_and_decode(dict(batch)), args.images))
            rates["decode device (header only)"].append(
                _rate(lambda: read_and_decode(dict(batch), defer_jpeg=True), args.images)
            )
            rates["torchvision"].append(_rate(lambda: decode_jpegs(blobs, "cpu"), args.images))
        deferred = read_and_decode(dict(batch), defer_jpeg=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"# {args.images} JPEG crops 112x112 (mean {np.mean([len(b) for b in blobs]) / 1024:.1f} KB), "
        f"median of {args.repeats} interleaved rounds, one core; {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    print("| reading stage | images/s per core | cores to feed 20,000 images/s |")
    print("|---|---|---|")
    for name in ("decode cpu", "decode device (header only)"):
        print(f"| {name} | {medians[name]:,.0f} | {GOAL / medians[name]:.1f} |")
    print(
        "\nreading with --decode device / --decode cpu: "
        f"{medians['decode device (header only)'] / medians['decode cpu']:.2f}x"
    )
    print(
        "torchvision libjpeg batch decode (the CPU stand-in of nvJPEG): "
        f"{medians['torchvision']:,.0f} images/s"
    )
    pixels = 112 * 112 * 3
    encoded = float(np.mean([len(b) for b in deferred["encoded"]]))
    print(
        f"bytes per row through the object store: {pixels:,} (--decode cpu: pixels) vs {encoded:,.0f} "
        f"(--decode device: the JPEG), {pixels / encoded:.1f}x less"
    )
    _tar_spans(blobs, args.repeats, s3=not args.no_s3)


def _tar_batch(blobs: list[bytes], url: str) -> tuple[bytes, dict[str, np.ndarray]]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"{index:06d}.jpg")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    count = len(members)
    return data, {
        "image_id": np.array([m.name for m in members], dtype=object),
        "url": np.array([url] * count, dtype=object),
        "offset": np.array([m.offset_data for m in members]),
        "length": np.array([m.size for m in members]),
    }


def _tar_spans(blobs: list[bytes], repeats: int, *, s3: bool) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        stores: dict[str, tuple[dict, dict | None]] = {}
        data, local = _tar_batch(blobs, str(Path(workdir) / "shard.tar"))
        Path(local["url"][0]).write_bytes(data)
        stores["local disk"] = (local, None)
        server = None
        if s3:
            import s3fs

            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' S3 server helper
            from tests.s3server import start_s3_server

            server = start_s3_server(Path(workdir) / "s3")
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
            fs.mkdir("bench")
            fs.pipe("bench/shard.tar", data)
            stores["S3 (SeaweedFS, loopback)"] = (
                _tar_batch(blobs, "s3://bench/shard.tar")[1],
                server.storage_options,
            )
        try:
            rates: dict[tuple[str, str], list[float]] = {}
            for _ in range(repeats):
                for store, (batch, options) in stores.items():
                    for mode, gap in (("spans", 1 << 20), ("one read per member", -1)):
                        fiqa_curator.workers.reading.MAX_GAP = gap
                        started = time.perf_counter()
                        out = read_and_decode(
                            dict(batch), storage_options=options, options_protocol="s3", defer_jpeg=True
                        )
                        rates.setdefault((store, mode), []).append(
                            len(blobs) / (time.perf_counter() - started)
                        )
                        assert list(out["encoded"]) == blobs, (store, mode)  # same rows either way
        finally:
            fiqa_curator.workers.reading.MAX_GAP = 1 << 20
            if server:
                server.stop()
    print(
        f"\n# one WebDataset tar of the same {len(blobs)} crops, one batch through read_and_decode "
        f"(--decode device), median of {repeats} interleaved rounds"
    )
    print("| store | spans (images/s) | one read per member (images/s) | ratio |")
    print("|---|---|---|---|")
    for store in stores:
        spans = statistics.median(rates[(store, "spans")])
        single = statistics.median(rates[(store, "one read per member")])
        print(f"| {store} | {spans:,.0f} | {single:,.0f} | {spans / single:.1f}x |")


if __name__ == "__main__":
    main()
