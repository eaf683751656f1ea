"""`fiqa score --since PREVIOUS` at scale: the driver's whole side of an incremental run, carried rows
committed, against the code of another checkout (the one before the shard-by-shard carry-over: both
listings and the carried rows in memory).

Each size is a synthetic PREVIOUS OUTPUT of N images, one row each (12 exits, 0.1% read errors, shards of
--shard-size), written as a run writes it (`flows.plan.make_plan`/`save_plan`, `build_quality_table` per
shard), and the current OUTPUT's plan and saved listing with 1% of the items changed or new (0.5% a new
version, 0.5% new images), built once under --workdir and reused. Each variant then runs in a fresh
process, interleaved: the current plan is loaded from its OUTPUT as a run has it, then timed: the carry-over
into a real `ShardWriter` (`flows.execution.carry_over`), then, standing in for the scoring pipeline, a
synthetic scored row for every image left to score, fed to the writer shard by shard, so that every shard
is committed. Printed per size and variant: wall seconds (carrying over, the rest, total), the process's
peak RSS (VmHWM, restarted just before the timed part), its RSS before the timed part, the images carried,
and the committed table's rows and a digest of its (image_id, run_id) pairs, which must agree between the
variants.

    .venv/bin/python benchmarks/bench_since.py --rows 1000000,3000000
    git worktree add /tmp/before b12b382
    .venv/bin/python benchmarks/bench_since.py --rows 1000000 --variants now,before --before /tmp/before
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from fiqa_curator.flows.options import DEFAULT_SHARD_SIZE
from fiqa_curator.flows.plan import load_plan, make_plan, read_listing_rows, save_plan
from fiqa_curator.flows.sources import InputItem, items_to_table
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas import build_quality_table
from fiqa_curator.schemas.layout import LISTING_FILE, SUCCESS_FILE, shard_file, shard_name
from fiqa_curator.schemas.quality_table import SCORE_COLUMNS
from fiqa_curator.schemas.status import Status

EXITS = 12
CONFIG = {
    "model_sha256": "0" * 64,
    "model_config": {"depth": EXITS, "embed_dim": 512},
    "exit_depth": EXITS,
    "fusion": "fw",
    "fusion_weights": [round(w / (EXITS * (EXITS + 1) / 2), 12) for w in range(1, EXITS + 1)],
    "max_pixels": 50_000_000,
    "schema_version": "2",
    "embeddings": False,
    "align": None,
    "precision": "fp32",
    "decode": "cpu",
}
CURRENT = "current"  # the current run's OUTPUT: its plan and listing only, as after planning


# ---- the synthetic OUTPUT ---------------------------------------------------------------------------------
def build(root: Path, rows: int, shard_size: int) -> None:
    """PREVIOUS under root/previous and the current run's plan under root/current (skipped when there)."""
    previous = Output(str(root / "previous"))
    if (root / CURRENT / LISTING_FILE).exists():
        return
    rng = np.random.default_rng(0)
    sizes = rng.integers(20_000, 400_000, rows)
    versions = rng.integers(0, 2**62, rows)
    items = []
    for n in range(rows):
        url = f"s3://corpus/img/{n:09d}.jpg"
        items.append(
            InputItem(f"img/{n:09d}.jpg", url, url, size=int(sizes[n]), version=f"{versions[n]:016x}")
        )
    plan = make_plan("s3://corpus/", "folder", items, shard_size, CONFIG)
    save_plan(previous, plan)
    failed = rng.random(rows) < 0.001
    for index in range(plan.shard_count):
        items_of_shard = plan.shard_listing(index)
        count = items_of_shard.num_rows
        first = index * shard_size
        status = np.where(failed[first : first + count], Status.READ_ERROR.value, Status.OK.value)
        columns = {
            "image_id": items_of_shard.column("image_id").to_pylist(),
            "source": items_of_shard.column("source").to_pylist(),
            "status": status.astype(object),
            "error": np.where(status == Status.OK.value, "", "read failed").astype(object),
            "byte_size": sizes[first : first + count],
            "width": np.full(count, 112),
            "height": np.full(count, 112),
            "resized": np.zeros(count, dtype=bool),
            "exit_scores": rng.random((count, EXITS), dtype=np.float32),
            **{name: rng.random(count, dtype=np.float32) for name in SCORE_COLUMNS},
            "model_sha256": CONFIG["model_sha256"],
            "run_id": "20260101T000000Z-previous",
            "shard": shard_name(index),
        }
        table = build_quality_table(
            columns,
            metadata={
                "fusion": CONFIG["fusion"],
                "fusion_weights": CONFIG["fusion_weights"],
                "config_fingerprint": plan.config_fingerprint,
            },
        )
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        previous.commit_bytes(shard_file(shard_name(index)), buffer.getvalue())
    previous.commit_bytes(SUCCESS_FILE, b"")
    # the current listing: 0.5% of the images rewritten (a new version), 0.5% new ones
    changed = set(rng.choice(rows, rows // 200, replace=False).tolist())
    added = set(rng.choice(rows, rows // 200, replace=False).tolist())
    current = []
    for n, item in enumerate(items):  # already in image_id order
        current.append(
            InputItem(item.image_id, item.source, item.url, size=item.size, version=item.version + "-2")
            if n in changed
            else item
        )
        if n in added:
            url = f"s3://corpus/img/{n:09d}b.jpg"
            current.append(InputItem(f"img/{n:09d}b.jpg", url, url, size=1000, version="1"))
    del items
    save_plan(
        Output(str(root / CURRENT)),
        make_plan("s3://corpus/", "folder", items_to_table(current), shard_size, CONFIG),
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's own peak (VmHWM): ru_maxrss would start at the parent's, inherited through fork."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB


def _reset_peak() -> bool:
    """Restart the peak RSS count (VmHWM, Linux >= 4.0) at the current RSS, so that the peak
    measured is the timed part's, not the imports'."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _scored(ids: list[str], shard: str) -> dict[str, np.ndarray]:
    """What the scoring pipeline would deliver for `ids`: one ok row each."""
    count = len(ids)
    rng = np.random.default_rng(count)
    return {
        "image_id": np.array(ids, dtype=object),
        "source": np.array([f"s3://corpus/{i}" for i in ids], dtype=object),
        "status": np.full(count, Status.OK.value, dtype=object),
        "error": np.full(count, "", dtype=object),
        "byte_size": np.full(count, 1000),
        "width": np.full(count, 112),
        "height": np.full(count, 112),
        "resized": np.zeros(count, dtype=bool),
        "exit_scores": rng.random((count, EXITS), dtype=np.float32),
        **{name: rng.random(count, dtype=np.float32) for name in SCORE_COLUMNS},
        "shard": np.full(count, shard, dtype=object),
    }


def child(root: Path) -> None:
    """One measured run of the code on sys.path (this checkout's, or --before's), printing one JSON line."""
    from fiqa_curator.flows import execution
    from fiqa_curator.flows.shard_writer import ShardWriter

    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(root / CURRENT, out)  # the plan and its listing, as after planning
    output = Output(str(out))
    plan = load_plan(output)
    pending = list(range(plan.shard_count))
    listing_url = output.full_url(LISTING_FILE)
    options = SimpleNamespace(since=str(root / "previous"), output=str(out), storage_options={})
    config = {**CONFIG, "model_config": dict(CONFIG["model_config"])}
    gc.collect()
    reset = _reset_peak()
    rss_before = _rss_mb()
    started = time.perf_counter()
    writer = ShardWriter(output, plan, pending, run_id="20260102T000000Z-now", config=config)
    if hasattr(execution, "shard_task"):  # this code: shard by shard from the saved listing
        tasks, carried = execution.carry_over(options, plan, pending, writer)
    else:  # the code before: the listing in memory, as its flow loaded it for --since
        from fiqa_curator.flows.plan import shard_tasks

        plan.listing = pq.read_table(listing_url)
        items = plan.pending_listing(pending)
        carried_ids = execution.carry_over(options, plan, items, config, writer)
        tasks, carried = shard_tasks(plan, pending, exclude=carried_ids, items=items), len(carried_ids)
        del items
    carried_s = time.perf_counter() - started
    for task in tasks:  # the scoring pipeline's deliveries, a shard at a time
        ids = (
            json.loads(task["only"])
            if task["only"]
            else read_listing_rows(listing_url, task["start"], task["stop"]).column("image_id").to_pylist()
        )
        writer.add(_scored(ids, task["shard"]))
    if writer.missing():
        raise RuntimeError(f"shards left uncommitted: {len(writer.missing())}")
    if hasattr(writer, "close"):
        writer.close()
    total = time.perf_counter() - started
    peak = _peak_mb()
    import duckdb

    rows, distinct, digest = duckdb.sql(
        f"SELECT count(*), count(DISTINCT image_id), bit_xor(hash(image_id || '|' || run_id)) "
        f"FROM read_parquet('{out}/scores/*.parquet')"
    ).fetchall()[0]
    print(
        json.dumps(
            {
                "carry_s": carried_s,
                "rest_s": total - carried_s,
                "total_s": total,
                "peak_rss_mb": peak,
                "rss_before_mb": rss_before,
                "peak_in_timed_part": reset,
                "carried": carried,
                "rows": rows,
                "distinct": distinct,
                "digest": hashlib.sha256(str(digest).encode()).hexdigest()[:12],
            }
        )
    )
    shutil.rmtree(out, ignore_errors=True)


def run_child(root: Path, code: Path | None, timeout: float) -> dict[str, Any] | None:
    environment = dict(os.environ)
    if code is not None:  # a checkout's package first on the path
        environment["PYTHONPATH"] = str(code.parent) + os.pathsep + environment.get("PYTHONPATH", "")
    command = [sys.executable, __file__, "--child", "--workdir", str(root)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode:
        raise RuntimeError(f"the run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def package_dir(checkout: Path) -> Path:
    """The `fiqa_curator` package of a checkout (its root: flows/, workers/, ... are the subpackages), as
    a link in a folder of its own, for PYTHONPATH."""
    link = Path(tempfile.mkdtemp(prefix="bench_since-code-")) / "fiqa_curator"
    link.symlink_to(checkout.resolve())
    return link


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", default="1000000", help="sizes, comma-separated (e.g. 1000000,3000000,10000000)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per shard, both runs"
    )
    parser.add_argument("--variants", default="now", help="in order: now (this checkout), before (--before)")
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (variant before)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant per size, interleaved")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is given up")
    parser.add_argument("--workdir", type=Path, help="where the synthetic OUTPUTs are built and kept")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.workdir)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_since-"))
    variants = args.variants.split(",")
    code = {"now": None, "before": package_dir(args.before) if "before" in variants else None}
    print(f"workdir {workdir}; shards of {args.shard_size}; {os.cpu_count()} CPUs")
    header = f"{'rows':>10} {'variant':>7} {'carry s':>8} {'rest s':>8} {'total s':>8} {'peak MB':>8} "
    print(header + f"{'RSS before':>10} {'added MB':>8} {'carried':>9} {'table rows':>10} digest")
    for rows in (int(size) for size in args.rows.split(",")):
        root = workdir / f"rows-{rows}-shard-{args.shard_size}"
        started = time.perf_counter()
        build(root, rows, args.shard_size)
        print(f"{rows:>10} built in {time.perf_counter() - started:.1f} s", flush=True)
        for _ in range(args.repeats):
            for variant in variants:
                result = run_child(root, code[variant], args.timeout)
                if result is None:
                    print(f"{rows:>10} {variant:>7} timed out after {args.timeout:g} s", flush=True)
                    continue
                mark = "" if result["peak_in_timed_part"] else " (peak: since the process started)"
                added = result["peak_rss_mb"] - result["rss_before_mb"]
                once = "" if result["rows"] == result["distinct"] else " REPEATED IDS"
                print(
                    f"{rows:>10} {variant:>7} {result['carry_s']:>8.2f} {result['rest_s']:>8.2f} "
                    f"{result['total_s']:>8.2f} {result['peak_rss_mb']:>8.0f} "
                    f"{result['rss_before_mb']:>10.0f} {added:>8.0f} "
                    f"{result['carried']:>9} {result['rows']:>10} {result['digest']}{once}{mark}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
