"""The driver's work at corpus scale, this tree side by side with a git revision (`--baseline`).

    python benchmarks/bench_scale.py writer [--rows 300000] [--shard-size 5000] [--rounds 3] [--baseline REV]
    python benchmarks/bench_scale.py plan [--rows 1000000 3000000] [--new-only-rows 10000000] [--baseline REV]
    python benchmarks/bench_scale.py folder [--objects 100000 300000 1000000] [--baseline REV]
    python benchmarks/bench_scale.py tars [--tars 1000] [--per-tar 1000] [--rounds 2]

writer: how many scored rows/s `ShardWriter` takes on one core. Every scored row comes back to the driver,
which cuts batches per shard and commits each shard (a zstd Parquet file, written whole) when its last row
arrives. One H200 scores about 20,000 images/s (docs/benchmarks.md), so a driver that serves 25 of them
must take 500,000 rows/s. Synthetic scored batches (the scoring stage's columns, 12 exits, blocks of 1,024
rows in listing order, so that a block may straddle two shards) go to this tree's writer and to the
revision's (loaded from `git show` with its `build_quality_table`), interleaved, each into its own local
OUTPUT; rows/s with and without the commits (table building, Parquet encoding, the atomic write).

plan: what planning a Parquet manifest of N rows costs the driver (listing it: this tree spills and sorts
it on local disk, older revisions `discover` it in memory; make_plan; save_plan: seconds and peak RSS over
the interpreter's own, each run a fresh process), this tree against a checkout of the revision, the same
manifest for both.

folder: planning a folder of N small objects on the S3 server (SeaweedFS on loopback), this tree against
the revision, each a fresh process: listing speed in objects/s (listing and sorting them), seconds and peak
RSS of the whole planning. The sizes nest (N1 objects under corpus/x/y/z, N2 - N1 more under corpus/x/y,
the rest under corpus/x), uploaded as the sizes grow, so each size is measured as soon as it exists.

tars: planning a folder of WebDataset shards on the S3 server (SeaweedFS on loopback): the shards'
members enumerated on the driver (`sources.list_tars_in_process`, what `fiqa score` did before) against
in Ray tasks (`tar_listing.list_tars_in_ray_tasks`, what it does now for big inputs), interleaved, each a
fresh process: seconds, the bytes of shards the driver itself read from S3 (every S3 read in the process
counted), its peak RSS, and that both listings are identical. 112x112 JPEG crops, an identity per sample.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fiqa_curator.flows.plan import Plan, make_plan
from fiqa_curator.flows.shard_writer import ShardWriter
from fiqa_curator.flows.sources import ITEM_SCHEMA
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


class _ItemCountsOnly:
    """What an older writer asks of a plan (`shard_items` for their count), without the items."""

    def __init__(self, plan: Plan) -> None:
        self.config_fingerprint = plan.config_fingerprint
        self.shard_items = lambda index: range(plan.shard_length(index))


def run(writer_class: type, plan, batches: list[dict[str, np.ndarray]], folder: Path) -> dict[str, float]:
    output = Output(str(folder))
    given = plan if writer_class is ShardWriter else _ItemCountsOnly(plan)
    writer = writer_class(output, given, list(range(plan.shard_count)), run_id="bench", config=CONFIG)
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


def writer_benchmark(args: argparse.Namespace) -> dict:
    batches = scored_batches(args.rows, args.shard_size, args.block_rows)
    ids = pa.array(np.concatenate([batch["image_id"] for batch in batches]), pa.string())
    listing = pa.table(
        {
            field.name: ids if field.name in ("image_id", "source", "url") else pa.nulls(len(ids), field.type)
            for field in ITEM_SCHEMA
        }
    )
    plan = make_plan("s3://corpus", "webdataset", listing, args.shard_size, {"exit_depth": DEPTH})
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
    return report


# The child scripts' peak memory: the process's own (VmHWM); ru_maxrss would start at the parent's peak,
# inherited through fork.
HWM_FUNCTION = """def hwm():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
"""

# One planning run in a fresh process: only names every revision has, so that it runs against either.
PLAN_CHILD = r"""
import json, sys, time

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

{hwm}
import tempfile
from fiqa_curator.flows.plan import make_plan, save_plan
from fiqa_curator.flows.storage import Output

manifest, output = sys.argv[1], sys.argv[2]
options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
before = rss()
started = time.perf_counter()
with tempfile.TemporaryDirectory() as folder:
    try:  # what `fiqa score` does since the listing is spilled and sorted on disk
        from fiqa_curator.flows.listing_sort import sort_listing
        from fiqa_curator.flows.sources import listing_parts

        kind, parts = listing_parts(manifest, options)
        items = sort_listing(parts, folder)
    except ImportError:  # a revision that plans in memory
        from fiqa_curator.flows.sources import discover

        kind, items = discover(manifest, options)
    discovered = time.perf_counter()
    plan = make_plan(manifest, kind, items, 5000, {"exit_depth": 12})
    planned = time.perf_counter()
    save_plan(Output(output), plan)
    saved = time.perf_counter()
peak = hwm()
print(json.dumps({
    "discover_s": discovered - started, "make_plan_s": planned - discovered, "save_plan_s": saved - planned,
    "total_s": saved - started, "rss_before_mb": before, "peak_rss_mb": peak, "added_mb": peak - before,
    "rss_after_mb": rss(), "items": plan.item_count,
    "objects_per_s": plan.item_count / (discovered - started),
}))
""".replace("{hwm}", HWM_FUNCTION)


def _manifest(path: Path, rows: int) -> None:
    """A Parquet manifest like a corpus's: absolute object-store URIs, identities, sizes, versions."""
    writer = None
    for start in range(0, rows, 1_000_000):
        n = np.arange(start, min(rows, start + 1_000_000))
        part = pa.table(
            {
                "uri": pa.array([f"s3://corpus/{i // 10_000:05d}/{i:09d}.jpg" for i in n.tolist()]),
                "identity": pa.array([f"person-{i // 40:08d}" for i in n.tolist()]),
                "size": pa.array(4000 + n % 2000),
                "version": pa.array([f"{i * 2654435761 % 2**32:08x}" for i in n.tolist()]),
            }
        )
        writer = writer or pq.ParquetWriter(path, part.schema)
        writer.write_table(part)
    writer.close()


def _checkout(revision: str, folder: Path) -> Path:
    """`revision`'s package as an importable folder (PYTHONPATH) beside this tree's."""
    tree = folder / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = folder / "path" / "fiqa_curator"
    package.mkdir(parents=True)
    for name in ("flows", "workers", "schemas", "evaluation", "demo_kit"):
        (package / name).symlink_to(tree / name)
    return folder / "path"


def plan_benchmark(args: argparse.Namespace) -> dict:
    report: dict = {}
    with tempfile.TemporaryDirectory() as work:
        baseline_path = _checkout(args.baseline, Path(work) / "baseline")
        for rows in sorted({*args.rows, *args.new_only_rows}):
            manifest = Path(work) / f"manifest-{rows}.parquet"
            _manifest(manifest, rows)
            variants = {"this tree": None}
            if rows in args.rows:
                variants[f"baseline {args.baseline}"] = str(baseline_path)
            for name, path in variants.items():
                output = Path(work) / f"out-{rows}-{name[:4]}"
                report.setdefault(str(rows), {})[name] = _plan_in_child(str(manifest), output, path)
                print(rows, name, report[str(rows)][name], flush=True)
    return report


def _plan_in_child(source: str, output: Path, pythonpath: str | None, options: str | None = None) -> dict:
    """PLAN_CHILD's figures for planning `source` into `output` in a fresh process (the package from
    `pythonpath` when given: a revision's checkout)."""
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else dict(os.environ)
    command = [sys.executable, "-c", PLAN_CHILD, source, str(output), *([options] if options else [])]
    run = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


FOLDER_PREFIXES = ("x/y/z", "x/y", "x")  # the nested prefixes of the folder benchmark's sizes


def upload_objects(filer_port: int, prefix: str, first: int, count: int) -> None:
    """`count` tiny objects named like a corpus's crops (`NNNN/NNNNNNN.jpg`) under `prefix` of the bucket,
    written through SeaweedFS's filer (the S3 gateway serves the same entries, with their ETags): a plain
    HTTP PUT costs a fraction of a signed S3 request, and a million of them must be written first. Their
    contents do not matter to a listing."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    def put(part: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", filer_port, timeout=60)
        for i in range(first + part, first + count, 4):
            connection.request("PUT", f"/buckets/{prefix}/{i // 1000:04d}/{i:07d}.jpg", body=b"%07d" % i)
            response = connection.getresponse()
            response.read()
            if response.status >= 300:
                raise RuntimeError(f"filer PUT failed: {response.status} {response.reason}")
        connection.close()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, range(4)))


def folder_benchmark(args: argparse.Namespace) -> dict:
    import s3fs

    sys.path.insert(0, str(REPO))  # the tests' S3 server helper
    from tests.s3server import start_s3_server

    sizes = sorted(args.objects)
    if len(sizes) > len(FOLDER_PREFIXES):
        raise SystemExit(f"at most {len(FOLDER_PREFIXES)} sizes")
    report: dict = {}
    with tempfile.TemporaryDirectory() as work:
        baseline_path = _checkout(args.baseline, Path(work) / "baseline")
        server = start_s3_server(Path(work) / "s3")
        try:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
            fs.mkdir("corpus")
            uploaded = 0
            options = json.dumps(server.storage_options)
            for size, prefix in zip(sizes, FOLDER_PREFIXES[len(FOLDER_PREFIXES) - len(sizes) :], strict=True):
                started = time.perf_counter()
                upload_objects(server.ports[3], f"corpus/{prefix}/p{size}", uploaded, size - uploaded)
                seconds = time.perf_counter() - started
                print(f"{size}: uploaded {size - uploaded} objects in {seconds:.0f} s", flush=True)
                uploaded = size
                variants = {"this tree": None, f"baseline {args.baseline}": str(baseline_path)}
                for name, path in variants.items():
                    output = Path(work) / f"out-{size}-{name[:4]}"
                    figures = _plan_in_child(f"s3://corpus/{prefix}", output, path, options)
                    report.setdefault(str(size), {})[name] = figures
                    print(size, name, figures, flush=True)
        finally:
            server.stop()
    return report


# One listing of the shards in a fresh process; `ray` lists them in Ray tasks on a private local Ray.
TARS_CHILD = r"""
import hashlib, json, sys, time
import s3fs.core

read = {"bytes": 0, "requests": 0}
fetch_range, cat_file = s3fs.core._fetch_range, s3fs.core.S3FileSystem._cat_file

def counted_fetch_range(*args, **kwargs):
    data = fetch_range(*args, **kwargs)
    read["bytes"] += len(data); read["requests"] += 1
    return data

async def counted_cat_file(self, *args, **kwargs):
    data = await cat_file(self, *args, **kwargs)
    read["bytes"] += len(data); read["requests"] += 1
    return data

s3fs.core._fetch_range, s3fs.core.S3FileSystem._cat_file = counted_fetch_range, counted_cat_file

{hwm}
from fiqa_curator.flows.cluster import init_ray
from fiqa_curator.flows.plan import listing_fingerprint
from fiqa_curator.flows.sources import discover, list_tars_in_process
from fiqa_curator.flows.tar_listing import list_tars_in_ray_tasks

url, where, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ray_seconds = 0.0
if where == "ray":
    started = time.perf_counter()
    init_ray(None)
    ray_seconds = time.perf_counter() - started
lister = list_tars_in_ray_tasks if where == "ray" else list_tars_in_process
started = time.perf_counter()
kind, items = discover(url, options, lister)
seconds = time.perf_counter() - started
print(json.dumps({
    "seconds": seconds, "ray_start_s": ray_seconds, "items": items.num_rows,
    "driver_bytes_read": read["bytes"], "driver_read_requests": read["requests"],
    "peak_rss_mb": hwm(),
    "fingerprint": listing_fingerprint(items),
}))
""".replace("{hwm}", HWM_FUNCTION)


def _face_crops(count: int) -> list[bytes]:
    """`count` distinct 112x112 JPEG crops (smooth shapes and noise, about the size of real face crops)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    ys, xs = np.mgrid[0:112, 0:112]
    crops = []
    for _ in range(count):
        waves = [np.sin(xs / rng.uniform(5, 30) + ys / rng.uniform(5, 30) + rng.uniform(0, 6)) for _ in "rgb"]
        base = np.stack(waves, axis=-1)
        pixels = np.clip(128 + 80 * base + rng.normal(0, 5, (112, 112, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        crops.append(buffer.getvalue())
    return crops


def _tar_bytes(crops: list[bytes], shard: int, per_tar: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for index in range(per_tar):
            key = f"{shard:05d}{index:05d}"
            data = crops[(shard * per_tar + index) % len(crops)]
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", f"person-{index // 20}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def upload_webdataset(fs, prefix: str, tars: int, per_tar: int) -> int:
    """`tars` WebDataset shards of `per_tar` samples under `prefix` on `fs`; returns their total bytes."""
    from concurrent.futures import ThreadPoolExecutor

    crops = _face_crops(256)

    def one(shard: int) -> int:
        data = _tar_bytes(crops, shard, per_tar)
        fs.pipe(f"{prefix}/shard-{shard:05d}.tar", data)
        return len(data)

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, range(tars)))


def tars_benchmark(args: argparse.Namespace) -> dict:
    import s3fs

    sys.path.insert(0, str(REPO))  # the tests' S3 server helper
    from tests.s3server import start_s3_server

    with tempfile.TemporaryDirectory() as work:
        server = start_s3_server(Path(work) / "s3")
        try:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
            fs.mkdir("corpus")
            started = time.perf_counter()
            total = upload_webdataset(fs, "corpus/wds", args.tars, args.per_tar)
            report: dict = {
                "tars": args.tars,
                "images": args.tars * args.per_tar,
                "tar_bytes": total,
                "upload_s": round(time.perf_counter() - started, 1),
                "runs": {"driver": [], "ray": []},
            }
            print({k: v for k, v in report.items() if k != "runs"}, flush=True)
            options = json.dumps(server.storage_options)
            for _ in range(args.rounds):
                for where in ("driver", "ray"):
                    run = subprocess.run(
                        [sys.executable, "-c", TARS_CHILD, "s3://corpus/wds", where, options],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    figures = json.loads(run.stdout.strip().splitlines()[-1])
                    figures["driver_share_of_tar_bytes"] = figures["driver_bytes_read"] / total
                    report["runs"][where].append(figures)
                    print(where, figures, flush=True)
        finally:
            server.stop()
    fingerprints = {run["fingerprint"] for runs in report["runs"].values() for run in runs}
    report["listings_identical"] = len(fingerprints) == 1
    for where, runs in report["runs"].items():
        report[f"{where}_median_s"] = statistics.median(run["seconds"] for run in runs)
    report["speed-up"] = report["driver_median_s"] / report["ray_median_s"]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("writer", help="rows/s of the driver's writer")
    writer.add_argument("--rows", type=int, default=300_000)
    writer.add_argument("--shard-size", type=int, default=5000)
    writer.add_argument("--block-rows", type=int, default=1024)
    writer.add_argument("--rounds", type=int, default=3)
    plan = commands.add_parser("plan", help="seconds and memory of planning a Parquet manifest")
    plan.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    plan.add_argument("--new-only-rows", type=int, nargs="*", default=[], help="sizes for this tree alone")
    for command in (writer, plan):
        command.add_argument("--baseline", default="e79e068", help="the git revision to compare with")
    folder = commands.add_parser("folder", help="planning a folder of N objects on the S3 server")
    folder.add_argument("--objects", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    folder.add_argument("--baseline", default="b52b6ee", help="the git revision to compare with")
    tars = commands.add_parser("tars", help="planning WebDataset shards on S3: on the driver vs in Ray tasks")
    tars.add_argument("--tars", type=int, default=1000)
    tars.add_argument("--per-tar", type=int, default=1000)
    tars.add_argument("--rounds", type=int, default=2)
    for command in (writer, plan, folder, tars):
        command.add_argument("--json")
    args = parser.parse_args(argv)
    benchmarks = {
        "writer": writer_benchmark,
        "plan": plan_benchmark,
        "folder": folder_benchmark,
        "tars": tars_benchmark,
    }
    report = benchmarks[args.command](args)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
