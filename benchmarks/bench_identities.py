"""`fiqa identities` at corpus scale: synthetic embeddings, time and peak RSS at growing sizes.

    python benchmarks/bench_identities.py [--sizes 1000000:100000 10000000:1000000] [--dimension 128]
        [--memory-limit 4GB] [--unweighted-too] [--before CHECKOUT] [--json FILE]

Each size IMAGES:IDENTITIES builds a quality table (the columns these commands read: image_id, source,
identity, status, error, quality; shards of 500,000 rows) and an embeddings folder (image_id, embedding
FLOAT[dimension]) under a scratch folder, then runs `fiqa identities OUTPUT --embeddings FOLDER` as a fresh
process and reports its wall time, its stages (`identities.json`) and its peak RSS (the child's VmHWM),
then `fiqa select OUTPUT --drop-outliers --drop-duplicates --min-identity-images 3` the same way. Sizes run
in the order given, so 1x and 10x are side by side in one run.

The data has a generative model in which quality means something: identity i has a random direction
c_i; an image of quality q (uniform in [0, 1]) is c_i + sigma(q) * noise, sigma falling from 2.0 at q = 0
to 0.6 at q = 1 (per dimension, against unit-variance directions), so that low-quality embeddings are the
unreliable ones. Identity sizes are 1 + Poisson(images/identities - 1). Planted, seeded: 2% of the images
labelled as another identity (mislabelled), 1% near-copies of the image before them (same identity,
noise 0.01), and 0.1% of the identities (those with at least 4 images) with half their images filed under
a second name. The figures include precision and recall of each against the plant, so that speed is never
bought with wrong answers; `--unweighted-too` repeats each size with `--unweighted`. `--before CHECKOUT`
runs another checkout's `fiqa identities` on the same data, then this checkout's a second time, each a
fresh process (`git worktree add /tmp/before COMMIT`): the two codes side by side, this one twice.

Also measured, once, at the largest identity count: the nearest-identity search
(`evaluation.identities.nearest_identities`) on the identity directions plus 2,000 noisy twins (how many
twins it pairs), and its recall at 1 against brute force on 2,000 random queries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_since import package_dir

SHARD_ROWS = 500_000
# the command in a fresh process that reports its own peak RSS (KiB) when it ends
# the child's own peak: VmHWM, not ru_maxrss (which starts at this process's peak, inherited through fork)
CHILD = (
    "import sys; from fiqa_curator.flows.cli import main; code = main(sys.argv[1:]); "
    "hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]; "
    "print('MAXRSS_KIB', hwm, file=sys.stderr); sys.exit(code)"
)
MISLABELLED, NEAR_COPIES, FILED_TWICE = 0.02, 0.01, 0.001
# rows per row group of the embeddings files, as DuckDB and Spark write them (~120k): DuckDB reads a row
# group's column whole, so pyarrow's default (1M rows: 0.5 GB of 128-d embeddings) would need that much
# per reading thread
EMBEDDING_ROW_GROUP = 65_536


def build(folder: Path, images: int, identities: int, dimension: int, seed: int = 0) -> dict:
    """The quality table under folder/quality and the embeddings under folder/embeddings; returns the
    plant (sets of image ids / identity names) as counts and arrays for scoring."""
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(max(0.0, images / identities - 1), size=identities)
    sizes[-1] += images - sizes.sum()  # exactly `images` (the last identity absorbs the rounding)
    while sizes[-1] < 1:  # rare: too many images drawn; take them back from the largest identities
        big = int(np.argmax(sizes[:-1]))
        sizes[big] -= 1
        sizes[-1] += 1
    owner = np.repeat(np.arange(identities), sizes)
    rank = np.arange(images) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    label = owner.copy()
    mislabelled = rng.random(images) < MISLABELLED
    label[mislabelled] = (owner[mislabelled] + rng.integers(1, identities, mislabelled.sum())) % identities
    copies = (rng.random(images) < NEAR_COPIES) & (rank > 0) & ~mislabelled
    copies[1:] &= ~mislabelled[:-1]
    twice = rng.choice(np.flatnonzero(sizes >= 4), size=max(1, int(FILED_TWICE * identities)), replace=False)
    second_name = np.zeros(images, dtype=bool)
    in_twice = np.isin(owner, twice) & (rank % 2 == 1) & ~mislabelled
    second_name[in_twice] = True
    quality = rng.random(images).astype(np.float32)
    (folder / "quality" / "scores").mkdir(parents=True)
    (folder / "embeddings").mkdir()
    centres = rng.standard_normal((identities, dimension)).astype(np.float32)
    for shard, start in enumerate(range(0, images, SHARD_ROWS)):
        stop = min(images, start + SHARD_ROWS)
        rows = np.arange(start, stop)
        ids = pa.array([f"id{owner[k]:07d}/img{rank[k]:03d}.jpg" for k in rows])
        names = pa.array([f"id{label[k]:07d}" + ("b" if second_name[k] else "") for k in rows], pa.string())
        sigma = (0.6 + 1.4 * (1.0 - quality[rows]))[:, None]
        vectors = centres[owner[rows]] + sigma * rng.standard_normal((len(rows), dimension), dtype=np.float32)
        shifted = np.flatnonzero(copies[rows])
        for k in shifted:  # a near-copy of the image before it (in the same shard when k > 0)
            if k > 0:
                vectors[k] = vectors[k - 1] + 0.01 * rng.standard_normal(dimension, dtype=np.float32)
        table = pa.table(
            {
                "image_id": ids,
                "source": ids,
                "identity": names,
                "status": pa.array(["ok"] * len(rows)),
                "error": pa.nulls(len(rows), pa.string()),
                "quality": pa.array(quality[rows]),
            }
        )
        pq.write_table(table, folder / "quality" / "scores" / f"shard-{shard:05d}.parquet")
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dimension)
        pq.write_table(
            pa.table({"image_id": ids, "embedding": embedding}),
            folder / "embeddings" / f"part-{shard:05d}.parquet",
            compression="none",
            row_group_size=EMBEDDING_ROW_GROUP,
        )
    (folder / "quality" / "_SUCCESS").write_bytes(b"")

    def name(k: int) -> str:
        return f"id{owner[k]:07d}/img{rank[k]:03d}.jpg"

    pairs = {(name(k), name(k - 1)) for k in np.flatnonzero(copies) if k % SHARD_ROWS}
    return {
        "mislabelled": {name(k) for k in np.flatnonzero(mislabelled)},
        "copies": pairs,
        "twice": {f"id{t:07d}" for t in twice},
        "centres": centres,
    }


def score(output: Path, plant: dict) -> dict:
    """Precision and recall of the outliers, near-duplicates and merge candidates against the plant."""
    images = pq.read_table(output / "curation" / "identity_images.parquet", columns=["image_id", "outlier"])
    flagged = set(images.filter(images.column("outlier")).column("image_id").to_pylist())
    dupes = pq.read_table(
        output / "curation" / "identity_images.parquet", columns=["image_id", "duplicate_of"]
    )
    dupes = dupes.filter(dupes.column("duplicate_of").is_valid()).to_pydict()
    duplicated = set(zip(dupes["image_id"], dupes["duplicate_of"], strict=True))
    people = pq.read_table(output / "curation" / "identities.parquet").to_pydict()
    right = [
        flag
        and nearest is not None
        and name != nearest
        and name.removesuffix("b") == nearest.removesuffix("b")
        for name, nearest, flag in zip(
            people["identity"], people["nearest_identity"], people["merge_candidate"], strict=True
        )
    ]
    merged = {name.removesuffix("b") for name, ok in zip(people["identity"], right, strict=True) if ok}
    flagged_identities = sum(people["merge_candidate"])

    def pr(found: set, truth: set) -> dict:
        hits = len(found & truth)
        return {
            "precision": round(hits / len(found), 4) if found else None,
            "recall": round(hits / len(truth), 4) if truth else None,
            "found": len(found),
            "planted": len(truth),
        }

    # a near-copy and its original are interchangeable: the one of lower quality goes, pointing to the other
    return {
        "outliers": pr(flagged, plant["mislabelled"]),
        "near_duplicates_recall": round(
            sum(1 for copy, original in plant["copies"] if {(copy, original), (original, copy)} & duplicated)
            / max(1, len(plant["copies"])),
            4,
        ),
        "near_duplicates_found": len(duplicated),
        "merges": {
            "pairs_found": len(merged),
            "planted": len(plant["twice"]),
            "recall": round(len(merged & plant["twice"]) / len(plant["twice"]), 4),
            "identities_flagged": flagged_identities,
            # a flagged identity is right when its nearest is its other half
            "precision": round(sum(right) / flagged_identities, 4) if flagged_identities else None,
        },
    }


def run_child(*arguments: str, code: Path | None = None) -> tuple[float, float]:
    """`fiqa ARGUMENTS` in a fresh process (with `code`, another checkout's package: `package_dir`): (wall
    seconds, its peak RSS in MB)."""
    environment = dict(os.environ)
    if code is not None:
        environment["PYTHONPATH"] = str(code.parent) + os.pathsep + environment.get("PYTHONPATH", "")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True, env=environment
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"fiqa {arguments[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    peak_kib = int(done.stderr.rsplit("MAXRSS_KIB", 1)[1].split()[0])
    return round(seconds, 1), round(peak_kib / 1024, 1)


def run_identities(
    output: Path, embeddings: Path, memory_limit: str | None, weighted: bool, code: Path | None = None
) -> dict:
    arguments = ["identities", str(output), "--embeddings", str(embeddings)]
    arguments += ["--memory-limit", memory_limit] if memory_limit else []
    arguments += [] if weighted else ["--unweighted"]
    seconds, peak = run_child(*arguments, code=code)
    summary = json.loads((output / "curation" / "identities.json").read_text())
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "stages": summary["seconds"],
        "peak_rss_mb_by_stage_end": summary.get("peak_rss_mb", {}),
        "thresholds": {
            k: None if v is None else round(v, 4) for k, v in summary["thresholds"].items() if k != "source"
        },
        "nearest_method": summary["nearest_method"],
        "work_partitions": summary["work_partitions"],
        "counts": {
            k: summary.get(k)  # `--before` code may lack newer counts
            for k in (
                "images",
                "identities",
                "below_similarity",
                "outliers",
                "duplicates",
                "merge_candidates",
            )
        },
    }


def run_select(output: Path, memory_limit: str | None) -> dict:
    """`fiqa select OUTPUT --drop-outliers --drop-duplicates --min-identity-images 3` in a fresh process."""
    arguments = ["select", str(output), "--drop-outliers", "--drop-duplicates", "--min-identity-images", "3"]
    seconds, peak = run_child(*arguments, *(["--memory-limit", memory_limit] if memory_limit else []))
    selection = json.loads((output / "curation" / "selection.json").read_text())
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "kept": selection["kept"],
        "dropped": {
            key: selection[key]
            for key in ("dropped_outliers", "dropped_duplicates", "dropped_small_identities")
        },
    }


def nearest_recall(centres: np.ndarray, queries: int = 2_000, twins: int = 2_000) -> dict:
    """The nearest-identity search on the largest size's identity directions plus `twins` noisy copies of
    some of them (one person filed twice: the pairs a merge must find; their cosine is about 0.77 here):
    how often each twin's nearest is found, and recall at 1 on random queries against brute force (iid
    directions in 128 dimensions are nearly equidistant: the hardest case for an inverted file)."""
    from fiqa_curator.evaluation.identities import nearest_identities, unit_rows

    rng = np.random.default_rng(1)
    originals = rng.choice(len(centres), size=twins, replace=False)
    noisy = centres[originals] + 0.8 * rng.standard_normal((twins, centres.shape[1]), dtype=np.float32)
    units, _ = unit_rows(np.vstack([centres, noisy]))
    started = time.perf_counter()
    found = nearest_identities(units)
    seconds = time.perf_counter() - started
    twin_index = np.arange(len(centres), len(units))
    twin_found = np.mean((found.index[originals] == twin_index) | (found.index[twin_index] == originals))
    sample = rng.choice(len(units), size=min(queries, len(units)), replace=False)
    products = units[sample] @ units.T
    products[np.arange(len(sample)), sample] = -np.inf
    exact = products.argmax(axis=1)
    return {
        "centres": len(units),
        "method": found.method,
        "seconds": round(seconds, 1),
        "twin_cosine_median": round(
            float(np.median(np.einsum("ij,ij->i", units[originals], units[twin_index]))), 3
        ),
        "twins_found": round(float(twin_found), 4),
        "recall_at_1_random_queries": round(float((found.index[sample] == exact).mean()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["1000000:100000", "10000000:1000000"])
    parser.add_argument("--dimension", type=int, default=128)
    parser.add_argument("--memory-limit", default=None)
    parser.add_argument("--unweighted-too", action="store_true")
    parser.add_argument("--scratch", default=None, help="folder for the data (default: a temporary one)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--no-nearest-check", action="store_true", help="skip the nearest-identity search's recall check"
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of other code: `fiqa identities` of both, interleaved, on the same data (weighted)",
    )
    args = parser.parse_args()
    before = package_dir(args.before) if args.before else None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="fiqa-bench-identities-"))
    results = {"dimension": args.dimension, "cpus": os.cpu_count(), "sizes": []}
    largest = None
    for size in args.sizes:
        images, identities = (int(x) for x in size.split(":"))
        folder = scratch / f"{images}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        plant = build(folder, images, identities, args.dimension)
        built = time.perf_counter() - started
        entry = {"images": images, "identities": identities, "build_seconds": round(built, 1)}
        for weighted in (True, False) if args.unweighted_too else (True,):
            figures = run_identities(folder / "quality", folder / "embeddings", args.memory_limit, weighted)
            figures["quality"] = score(folder / "quality", plant)
            entry["weighted" if weighted else "unweighted"] = figures
            print(json.dumps({"images": images, "weighted": weighted, **figures}), flush=True)
        if before is not None:  # the other code, then this checkout's again: the two side by side
            for name, code in (("before", before), ("again", None)):
                quality, embeddings = folder / "quality", folder / "embeddings"
                figures = run_identities(quality, embeddings, args.memory_limit, True, code)
                figures["quality"] = score(folder / "quality", plant)
                entry[name] = figures
                print(json.dumps({"images": images, "code": name, **figures}), flush=True)
        entry["select"] = run_select(folder / "quality", args.memory_limit)
        print(json.dumps({"images": images, "select": entry["select"]}), flush=True)
        results["sizes"].append(entry)
        largest = plant["centres"]
        shutil.rmtree(folder, ignore_errors=True)
    if largest is not None and not args.no_nearest_check:
        results["nearest_search"] = nearest_recall(largest)
        print(json.dumps(results["nearest_search"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
