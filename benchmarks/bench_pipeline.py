"""End-to-end throughput of `fiqa score` against the bare model, measured side by side in one run.

Generates N synthetic 112x112 JPEGs and a ViT-S-sized random checkpoint (token mode, dim 512, depth 12),
then for each exit depth (default 12 and 4):
  bare      QualityScorer.score on decoded uint8 batches already in memory: the model alone, same batch
            size, same torch thread count as the scoring actor, in a process of its own, every round
            (next to the pipeline's runs, not once before them); twice: as the Python API runs by
            default, and with the large buffers kept in the heap (`workers.allocator`, which the
            scoring actor does); the steady rate is given against both;
  pipeline  `fiqa score` in its own process (Prefect + local Ray + Parquet): images/s of the execute stage
            (read, decode, score, write, overlapped; start-up of the Ray workers and the model included),
            the steady rate once the first batch is out, the time to that first batch, the whole command,
            and the peak memory: PSS summed over the command's process tree (driver, Ray workers, Prefect
            server), so pages shared between processes (Ray's object store) count once; and its
            timeline (`_run.json`): when each step finished, in seconds since the process started;
  plain     (--plain) the same job as a plain Ray Data script (`plain_ray_data.py`: read_binary_files,
            map_batches with a callable class on an actor pool, write_parquet), same images, model, exit
            depth, batch size and threads, timed as a whole process like the pipeline, the two
            interleaved (which goes first alternates from one run to the next); with --rounds N each
            is run N times and the medians are reported, with every round's pair (the difference of
            whole-process times is fiqa's fixed cost over the plain script's on small inputs).

    python benchmarks/bench_pipeline.py [--images 3000] [--batch 64] [--depths 12 4] [--plain]
                                        [--rounds 1] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import torch
from PIL import Image

from fiqa_curator.workers import QualityScorer, ViTFIQA, ViTFIQAConfig, load_model
from fiqa_curator.workers.allocator import keeps_large_buffers, large_buffer_environment


def make_inputs(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:112, 0:112]
    for index in range(count):
        base = np.dstack([xx * 2, yy * 2, (xx + yy)]).astype(np.int16) + rng.integers(-30, 30, (112, 112, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        (folder / f"img_{index:05d}.jpg").write_bytes(buffer.getvalue())


def bare_rate(scorer: QualityScorer, images: np.ndarray, exit_depth: int, batches: int) -> float:
    scorer.score(images[: scorer.batch_size], exit_depth=exit_depth)  # warm-up
    chunk = images[: scorer.batch_size * batches]
    start = time.perf_counter()
    scorer.score(chunk, exit_depth=exit_depth)
    return len(chunk) / (time.perf_counter() - start)


def bare_child(work: Path, exit_depth: int, batches: int, batch: int, keep_buffers: bool) -> float:
    """`bare_rate` in a fresh process, with the scoring actor's allocator settings or without (they hold from
    a process's start: `workers.allocator`). The model runs on the main thread here; the settings make the
    actor's calling thread use the main arena too, so the two compare."""
    command = [sys.executable, __file__, "--bare-child", str(work), str(exit_depth), str(batches), str(batch)]
    environment = {**os.environ, **(large_buffer_environment() if keep_buffers else {})}
    done = subprocess.run(
        [*command, "keep" if keep_buffers else "default"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=1800,
    )
    if done.returncode:
        raise SystemExit(f"the bare model failed: {done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def bare_child_main(work: Path, exit_depth: int, batches: int, batch: int, mode: str) -> None:
    if (mode == "keep") != keeps_large_buffers():
        raise SystemExit(f"the bare model's process was not started as asked ({mode})")
    scorer = QualityScorer(load_model(work / "model.pt", "vit_s_qs"), device="cpu", batch_size=batch)
    decoded = np.stack(
        [
            np.asarray(Image.open(p).convert("RGB"))
            for p in sorted((work / "images").iterdir())[: batch * batches]
        ]
    )
    print(bare_rate(scorer, decoded, exit_depth, batches))


SAMPLE_SECONDS = 3.0  # reading every process's PSS takes 7-8% of a core when done every second


def tree_pss(process: psutil.Process) -> int:
    """Proportional set size summed over the process tree: shared pages (Ray's object store is mapped into
    every worker) count once in total, where summed RSS would count them once per process."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += member.memory_full_info().pss
    return total


def run_pipeline(args: list[str]) -> tuple[float, int]:
    """`fiqa ARGS`: (seconds, peak PSS of its process tree)."""
    return run_process([str(Path(sys.executable).parent / "fiqa"), *args])


def run_process(command: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    watched = psutil.Process(process.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss(watched))
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"failed with exit status {code}: {' '.join(command)}")
    return time.perf_counter() - start, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 4])
    parser.add_argument("--bare-batches", type=int, default=6, help="batches timed for the bare model")
    parser.add_argument("--plain", action="store_true", help="also time the plain Ray Data script")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each command; medians reported")
    parser.add_argument("--json", help="also write the figures to this file")
    if len(sys.argv) == 7 and sys.argv[1] == "--bare-child":
        bare_child_main(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        return
    args = parser.parse_args()

    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="fiqa-bench-"))
    make_inputs(work / "images", args.images)
    config = ViTFIQAConfig.preset("vit_s_qs")
    torch.manual_seed(0)
    torch.save(ViTFIQA(config).state_dict(), work / "model.pt")
    threads = torch.get_num_threads()

    print(
        f"{args.images} JPEGs 112x112; ViT-S token (dim 512, depth 12); batch {args.batch}; "
        f"{threads} torch threads; {os.cpu_count()} CPUs; torch {torch.__version__}"
    )
    print(
        f"{'exit':>4} {'bare img/s':>10} {'pipeline img/s':>15} {'ratio':>6} {'steady img/s':>13} "
        f"{'ratio':>6} {'first batch':>12} {'wall img/s':>11} {'peak PSS':>9}"
    )
    results = []
    for position, depth in enumerate(args.depths):
        out = work / f"out-{depth}"
        # the same model, exit depth and batch for both
        job = ["--checkpoint", str(work / "model.pt"), "--arch", "vit_s_qs", "--exit-depth", str(depth)]
        job += ["--batch-size", str(args.batch)]
        fiqa_args = ["score", str(work / "images"), str(out), *job, "--shard-size", "500", "--no-progress"]
        fiqa_args += ["--device", "cpu"]
        plain_script = str(Path(__file__).with_name("plain_ray_data.py"))
        plain_out = str(work / f"plain-{depth}")
        plain_command = [sys.executable, plain_script, str(work / "images"), plain_out, *job]
        plain_command += ["--threads", str(os.cpu_count())]  # what fiqa's one CPU actor gets: every CPU
        walls, peaks, plain_walls, plain_peaks, records, bares, kept_bares = [], [], [], [], [], [], []
        for round_ in range(args.rounds):
            plain_first = (position + round_) % 2 == 1
            for keep in (plain_first, not plain_first):
                (kept_bares if keep else bares).append(
                    bare_child(work, depth, args.bare_batches, args.batch, keep_buffers=keep)
                )
            for folder in (out, Path(plain_out)):  # every round starts from nothing, like the first
                shutil.rmtree(folder, ignore_errors=True)
            if args.plain and plain_first:
                plain_measured = run_process(plain_command)
            fiqa_measured = run_pipeline(fiqa_args)
            if args.plain and not plain_first:
                plain_measured = run_process(plain_command)
            walls.append(fiqa_measured[0])
            peaks.append(fiqa_measured[1])
            records.append(json.loads((out / "_run.json").read_text()))
            if args.plain:
                plain_walls.append(plain_measured[0])
                plain_peaks.append(plain_measured[1])
                print(
                    f"     round {round_ + 1}: fiqa {walls[-1]:.1f} s, plain {plain_walls[-1]:.1f} s "
                    f"({'plain' if plain_first else 'fiqa'} first), "
                    f"difference {walls[-1] - plain_walls[-1]:+.1f} s"
                )
        bare, kept_bare = float(np.median(bares)), float(np.median(kept_bares))
        wall, peak = float(np.median(walls)), max(peaks)
        plain_wall = float(np.median(plain_walls)) if plain_walls else None
        plain_peak = max(plain_peaks) if plain_peaks else None
        record = records[int(np.argsort(walls)[len(walls) // 2])]  # the median round's record
        pipeline = record["images_per_second"]
        steady = record["stages"]["steady_images_per_second"]
        result = {
            "exit_depth": depth,
            "bare_images_per_s": bare,
            "pipeline_images_per_s": pipeline,
            "ratio": pipeline / bare,
            "steady_images_per_s": steady,
            "steady_ratio": steady / bare,
            "bare_kept_buffers_images_per_s": kept_bare,
            "steady_ratio_kept_buffers": steady / kept_bare,
            "bare_rounds": bares,
            "bare_kept_buffers_rounds": kept_bares,
            "first_batch_s": record["stages"]["first_batch_seconds"],
            "wall_s": wall,
            "wall_images_per_s": args.images / wall,
            "peak_pss_bytes": peak,
            "total_rows": record["total_rows"],
            "timeline": record.get("timeline", {}),
        }
        if plain_wall is not None:
            written = sum(pq.read_metadata(f).num_rows for f in (work / f"plain-{depth}").glob("*.parquet"))
            result.update(
                plain_wall_s=plain_wall,
                plain_wall_images_per_s=args.images / plain_wall,
                plain_peak_pss_bytes=plain_peak,
                rounds=args.rounds,
                fiqa_wall_s_rounds=walls,
                plain_wall_s_rounds=plain_walls,
                startup_difference_s=float(np.median(np.subtract(walls, plain_walls))),
                plain_rows=written,
                fiqa_vs_plain=plain_wall / wall,
            )
        results.append(result)
        print(
            f"{depth:>4} {bare:>10.2f} {pipeline:>15.2f} {pipeline / bare:>6.2f} {steady:>13.2f} "
            f"{steady / bare:>6.2f} {record['stages']['first_batch_seconds']:>10.1f} s "
            f"{args.images / wall:>11.2f} {peak / 2**30:>7.2f} G"
        )
        print(
            f"     bare with large buffers kept (as the actor): {kept_bare:.2f} img/s; steady ratio "
            f"{steady / kept_bare:.2f}; bare per round {[round(b, 1) for b in bares]}, kept "
            f"{[round(b, 1) for b in kept_bares]}"
        )
        print("     fiqa timeline (s since process start):", result["timeline"])
        if plain_wall is not None:
            print(
                f"     plain Ray Data script: {plain_wall:.1f} s whole process "
                f"({args.images / plain_wall:.2f} img/s, {written} rows, "
                f"peak PSS {plain_peak / 2**30:.2f} G); fiqa {wall:.1f} s: "
                f"fiqa/plain speed {plain_wall / wall:.2f}x; median difference "
                f"{result['startup_difference_s']:+.1f} s over {args.rounds} round(s)"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"images": args.images, "batch": args.batch, "threads": threads, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
