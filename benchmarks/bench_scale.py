"""The driver's work per scored row at corpus scale: how many rows/s `ShardWriter` takes on one core.

Every scored row comes back to the driver, which cuts batches per shard and commits each shard (a zstd
Parquet file, written whole) when its last row arrives. One H200 scores about 20,000 images/s
(docs/benchmarks.md), so a driver that serves 25 of them must take 500,000 rows/s. This feeds synthetic
scored batches (the scoring stage's columns, 12 exits, blocks of 1,024 rows in listing order, so that a
block may straddle two shards) to the writer of this tree and to the writer of a git revision
(`--baseline`, loaded from `git show` with that revision's `build_quality_table`), interleaved, each into
its own local OUTPUT, and prints rows/s with and without the commits (table building, Parquet encoding,
the atomic write).

    python benchmarks/bench_scale.py [--rows 300000] [--shard-size 5000] [--rounds 3] [--baseline e79e068]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fiqa_curator.flows.plan import make_plan
from fiqa_curator.flows.shard_writer import ShardWriter
from fiqa_curator.flows.sources import InputItem
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.batch import BATCH_COLUMNS, EMBEDDING, READ_LOCATION, RUN_ID
from fiqa_curator.schemas.layout import shard_name
from fiqa_curator.schemas.quality_table import SCORE_COLUMNS

REPO = Path(__file__).resolve().parents[1]
DEPTH = 12
CONFIG = {
    "model_sha256": "0" * 64,
    "exit_depth": DEPTH,
    "fusion": "fw",
    "fusion_weights": list(np.arange(1, DEPTH + 1) / np.arange(1, DEPTH + 1).sum()),
}


def scored_batches(rows: int, shard_size: int, block_rows: int) -> list[dict[str, np.ndarray]]:
    """What the scoring stage hands the driver: every column of a scored batch, rows in listing order."""
    rng = np.random.default_rng(0)
    ids = np.array([f"s3://corpus/part-{n // 1000:05d}.tar#{n:09d}" for n in range(rows)], dtype=object)
    shards = np.array([shard_name(n // shard_size) for n in range(rows)], dtype=object)
    skip = (*READ_LOCATION, EMBEDDING.name, RUN_ID.name)
    batches = []
    for start in range(0, rows, block_rows):
        count = min(block_rows, rows - start)
        batch = {
            name: column.empty(count, DEPTH if column.width == 0 else None)
            for name, column in BATCH_COLUMNS.items()
            if name not in skip
        }
        batch.update(
            image_id=ids[start : start + count],
            item_id=ids[start : start + count],
            source=ids[start : start + count],
            shard=shards[start : start + count],
            status=np.full(count, "ok", dtype=object),
            byte_size=rng.integers(3000, 6000, count),
            width=np.full(count, 112),
            height=np.full(count, 112),
            exit_scores=rng.random((count, DEPTH), dtype=np.float32),
            scored_on=np.full(count, "node-1", dtype=object),
            device_decoded=np.zeros(count, dtype=bool),
        )
        for name in SCORE_COLUMNS:
            batch[name] = rng.random(count, dtype=np.float32)
        batches.append(batch)
    return batches


def _module_at(revision: str, path: str, name: str):
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baseline_writer(revision: str) -> type:
    """The ShardWriter class of `revision` with that revision's table building, from git (the rest of the
    package comes from this tree)."""
    module = _module_at(revision, "flows/shard_writer.py", "baseline_shard_writer")
    module.build_quality_table = _module_at(
        revision, "schemas/quality_table.py", "baseline_quality_table"
    ).build_quality_table
    return module.ShardWriter


def run(writer_class: type, plan, batches: list[dict[str, np.ndarray]], folder: Path) -> dict[str, float]:
    output = Output(str(folder))
    writer = writer_class(output, plan, list(range(plan.shard_count)), run_id="bench", config=CONFIG)
    started = time.perf_counter()
    for batch in batches:
        writer.add(batch)
    seconds = time.perf_counter() - started
    assert not writer.missing() and len(writer.committed) == plan.shard_count
    rows = plan.item_count
    return {
        "rows_per_second": rows / seconds,
        "rows_per_second_without_commits": rows / (seconds - writer.write_seconds),
        "commit_share": writer.write_seconds / seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--block-rows", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="e79e068", help="git revision of the writer to compare with")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    batches = scored_batches(args.rows, args.shard_size, args.block_rows)
    items = [
        InputItem(str(image_id), str(image_id), "s3://corpus") for b in batches for image_id in b["image_id"]
    ]
    plan = make_plan("s3://corpus", "webdataset", items, args.shard_size, {"exit_depth": DEPTH})
    writers = {"this tree": ShardWriter, f"baseline {args.baseline}": baseline_writer(args.baseline)}
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in writers}
    with tempfile.TemporaryDirectory() as work:
        # round 0 warms up (imports, allocator) and is not counted; then interleaved rounds, so that the
        # machine's noise falls on both writers alike
        for round_ in range(args.rounds + 1):
            for name, writer_class in writers.items():
                figures_of_round = run(writer_class, plan, batches, Path(work) / f"{name[:4]}-{round_}")
                if round_:
                    figures[name].append(figures_of_round)
    report = {
        "rows": args.rows,
        "shard_size": args.shard_size,
        "block_rows": args.block_rows,
        "exits": DEPTH,
        **{
            name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for name, runs in figures.items()
        },
    }
    ours, theirs = (report[name]["rows_per_second"] for name in writers)
    report["speed-up"] = ours / theirs
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
