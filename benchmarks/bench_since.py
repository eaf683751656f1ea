"""`fiqa score --since PREVIOUS` at scale: finding and reading the rows to carry over, the Arrow matching of
`flows.incremental` side by side with the Python loops it replaced (copied below as `old_*`).

Each size is a synthetic PREVIOUS OUTPUT of N images, one row each (12 exits, 0.1% read errors, shards of
--shard-size), written as a run writes it (`flows.plan.make_plan`/`save_plan`, `build_quality_table` per
shard), and a current listing with 1% of its items changed or new (0.5% a new version, 0.5% new images),
built once under --workdir and reused. Each variant then runs in a fresh process, interleaved: the current
plan is made (not timed), then what `flows.execution.carry_over` does but the writer is timed: the pending
items' table (or the old `shard_of` dict), `unchanged_items`, and draining `carried_batches`. Printed per
size and variant: wall seconds (matching, draining, total), the process's peak RSS (VmHWM, its count
restarted just before the timed part), its RSS before the timed part (the plan's items, which both variants
hold) and the difference, the rows and images carried and a digest of their ids (which must agree between
the variants).

    .venv/bin/python benchmarks/bench_since.py --rows 1000000,3000000
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa_curator.flows.incremental import (
    IncrementalError,
    carried_batches,
    check_previous,
    unchanged_items,
)
from fiqa_curator.flows.options import DEFAULT_SHARD_SIZE
from fiqa_curator.flows.plan import Plan, make_plan, save_plan
from fiqa_curator.flows.sources import InputItem, items_to_table
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas import build_quality_table
from fiqa_curator.schemas.batch import FACE_ID_PATTERN, batch_from_table
from fiqa_curator.schemas.layout import LISTING_FILE, SCORES, SUCCESS_FILE, shard_file, shard_name
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
CURRENT_LISTING = "current.parquet"
_ITEM_KEY = ("url", "offset", "length", "size", "version")


# ---- the implementation before the Arrow matching, as it was ----------------------------------------------
def old_unchanged_items(previous: Output, plan: Plan, items: Iterable[Any]) -> set[str]:
    """image_ids of `items` whose listing entry in PREVIOUS is identical, with a known version."""
    check_previous(previous, plan)
    raw = previous.read_bytes(LISTING_FILE)
    if raw is None:
        raise IncrementalError(f"--since {previous.full_url()}: its listing ({LISTING_FILE}) is missing")
    listing = pq.read_table(io.BytesIO(raw), columns=["image_id", *_ITEM_KEY]).to_pylist()
    before = {row["image_id"]: tuple(row[k] for k in _ITEM_KEY) for row in listing}
    return {
        item.image_id
        for item in items
        if item.version
        and before.get(item.image_id) == (item.url, item.offset, item.length, item.size, item.version)
    }


def old_carried_batches(
    previous: Output,
    item_ids: set[str],
    shard_of_item: Mapping[str, str],
    *,
    config: Mapping[str, Any],
) -> Iterator[dict[str, np.ndarray]]:
    widths = {"exit_scores": int(config["exit_depth"]), "embedding": int(config["model_config"]["embed_dim"])}
    wanted = pa.array(sorted(item_ids), pa.string())
    for name in sorted(previous.list(SCORES)):
        if not name.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(previous.read_bytes(shard_file(name.removesuffix(".parquet")))))
        ids = table.column("image_id")
        owner = pc.replace_substring_regex(ids, FACE_ID_PATTERN, "") if config["align"] == "all" else ids
        table = table.append_column("item_id", owner).filter(pc.is_in(owner, wanted))
        if not table.num_rows:
            continue
        retry = pc.equal(table.column("status"), Status.READ_ERROR.value)
        if pc.any(retry).as_py():
            failed = pc.unique(table.filter(retry).column("item_id"))
            table = table.filter(pc.invert(pc.is_in(table.column("item_id"), failed)))
            if not table.num_rows:
                continue
        owners = table.column("item_id").to_pylist()
        counts = Counter(owners)
        batch = batch_from_table(table, widths)
        batch["item_id"] = np.array(owners, dtype=object)
        batch["item_rows"] = np.array([counts[o] for o in owners], dtype=np.int64)
        batch["shard"] = np.array([shard_of_item[o] for o in owners], dtype=object)
        yield batch


def shard_items(plan: Plan, index: int) -> list[InputItem]:
    """A shard's items as the objects the old code took."""
    return [InputItem(**row) for row in plan.shard_listing(index).to_pylist()]


def old_carry(previous: Output, plan: Plan, pending: list[int]) -> tuple[float, int, set[str]]:
    """The old `carry_over` but the writer: (seconds to find the unchanged items, rows, items carried)."""
    started = time.perf_counter()
    shard_of = {item.image_id: shard_name(i) for i in pending for item in shard_items(plan, i)}
    unchanged = old_unchanged_items(previous, plan, (item for i in pending for item in shard_items(plan, i)))
    matched = time.perf_counter() - started
    rows, carried = 0, set()
    for batch in old_carried_batches(previous, unchanged, shard_of, config=CONFIG):
        rows += len(batch["image_id"])
        carried.update(str(item) for item in batch["item_id"])
    return matched, rows, carried


def new_carry(previous: Output, plan: Plan, pending: list[int]) -> tuple[float, int, pa.Array]:
    """Today's `carry_over` but the writer."""
    started = time.perf_counter()
    unchanged = unchanged_items(previous, plan, plan.pending_listing(pending))
    matched = time.perf_counter() - started
    rows, carried = 0, []
    for batch in carried_batches(previous, unchanged, config=CONFIG):
        rows += len(batch["image_id"])
        carried.append(pa.array(batch["item_id"], pa.string()))
    return matched, rows, pc.unique(pa.chunked_array(carried, pa.string()))


# ---- the synthetic OUTPUT ---------------------------------------------------------------------------------
def build(root: Path, rows: int, shard_size: int) -> None:
    """PREVIOUS under root/previous and the current listing (skipped when already there)."""
    previous = Output(str(root / "previous"))
    if (root / CURRENT_LISTING).exists():
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
    pq.write_table(items_to_table(current), root / (CURRENT_LISTING + ".part"))
    os.replace(root / (CURRENT_LISTING + ".part"), root / CURRENT_LISTING)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's own peak (VmHWM): ru_maxrss would start at the parent's, inherited through fork."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB


def _reset_peak() -> bool:
    """Restart the peak RSS count (VmHWM, Linux >= 4.0) at the current RSS, so that the peak
    measured is the timed part's, not the plan's loading."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def child(variant: str, root: Path, shard_size: int) -> None:
    """One measured run, printing one JSON line."""
    plan = make_plan("s3://corpus/", "folder", pq.read_table(root / CURRENT_LISTING), shard_size, CONFIG)
    gc.collect()
    previous = Output(str(root / "previous"))
    pending = list(range(plan.shard_count))
    reset = _reset_peak()
    rss_before, peak_before = _rss_mb(), _peak_mb()
    started = time.perf_counter()
    matched, rows, carried = (new_carry if variant == "new" else old_carry)(previous, plan, pending)
    total = time.perf_counter() - started
    peak = _peak_mb()
    carried = sorted(carried.to_pylist() if isinstance(carried, pa.Array) else carried)
    digest = hashlib.sha256("\n".join(carried).encode()).hexdigest()[:16]
    print(
        json.dumps(
            {
                "match_s": matched,
                "drain_s": total - matched,
                "total_s": total,
                "peak_rss_mb": peak,
                "rss_before_mb": rss_before,
                "peak_in_timed_part": reset or peak > peak_before,
                "rows": rows,
                "items": len(carried),
                "digest": digest,
            }
        )
    )


def run_child(variant: str, root: Path, shard_size: int, timeout: float) -> dict[str, Any] | None:
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--workdir",
        str(root),
        "--shard-size",
        str(shard_size),
    ]
    try:
        out = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", default="1000000", help="sizes, comma-separated (e.g. 1000000,3000000,10000000)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per file of PREVIOUS"
    )
    parser.add_argument("--variants", default="new,old", help="which implementations, in order: new, old")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant per size, interleaved")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is given up")
    parser.add_argument("--workdir", type=Path, help="where the synthetic OUTPUTs are built and kept")
    parser.add_argument("--child", choices=("new", "old"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workdir, args.shard_size)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_since-"))
    variants = args.variants.split(",")
    print(f"workdir {workdir}; shards of {args.shard_size}; {os.cpu_count()} CPUs")
    header = f"{'rows':>10} {'variant':>7} {'match s':>8} {'drain s':>8} {'total s':>8} {'peak MB':>8} "
    print(header + f"{'RSS before':>10} {'added MB':>8} {'rows carried':>12} {'images':>9} digest")
    for rows in (int(size) for size in args.rows.split(",")):
        root = workdir / f"rows-{rows}-shard-{args.shard_size}"
        started = time.perf_counter()
        build(root, rows, args.shard_size)
        print(f"{rows:>10} built in {time.perf_counter() - started:.1f} s", flush=True)
        totals: dict[str, list[float]] = {variant: [] for variant in variants}
        for _ in range(args.repeats):
            for variant in variants:
                result = run_child(variant, root, args.shard_size, args.timeout)
                if result is None:
                    print(f"{rows:>10} {variant:>7} timed out after {args.timeout:g} s", flush=True)
                    continue
                totals[variant].append(result["total_s"])
                mark = (
                    "" if result["peak_in_timed_part"] else " (peak: the plan's loading, before the timing)"
                )
                added = result["peak_rss_mb"] - result["rss_before_mb"]
                print(
                    f"{rows:>10} {variant:>7} {result['match_s']:>8.2f} {result['drain_s']:>8.2f} "
                    f"{result['total_s']:>8.2f} {result['peak_rss_mb']:>8.0f} "
                    f"{result['rss_before_mb']:>10.0f} {added:>8.0f} "
                    f"{result['rows']:>12} {result['items']:>9} {result['digest']}{mark}",
                    flush=True,
                )
        if all(totals.get(v) for v in ("new", "old")):
            ratio = min(totals["old"]) / min(totals["new"])
            print(f"{rows:>10} old/new total time: {ratio:.1f}x", flush=True)


if __name__ == "__main__":
    main()
