"""The analysts' commands on large quality tables: time and peak memory of `fiqa report`, `fiqa select
--drop-fraction 0.1` and two `fiqa query`s (a summary by status; a row per identity), each in its own
process under /usr/bin/time, at several sizes.

Each size is a synthetic finished OUTPUT (12 exits, 2% failures, one identity per 20 images, shards of
`--shard-rows`), built once under --workdir and reused. With `--baseline REV`, the same commands of the code
at git revision REV (e.g. the last one before DuckDB) run side by side, interleaved, on the sizes up to
`--baseline-max-rows` (the old report needed ~1.7 GB per million rows).

    python benchmarks/bench_report.py --rows 1000000,10000000 --baseline 5eb536e
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fiqa_curator.schemas import build_quality_table

REPO = Path(__file__).resolve().parent.parent
EXITS = 12
# a summary whose result has a fixed size, and one with a row per identity (its result grows with the table)
QUERY = "SELECT status, count(*) AS images, avg(quality) AS mean, max(exit_scores[1]) FROM scores GROUP BY 1"
QUERY_BY_ID = (
    "SELECT identity, count(*) AS images, avg(quality) AS mean FROM scores GROUP BY 1 ORDER BY 2 DESC"
)


def build_table(out: Path, rows: int, shard_rows: int) -> None:
    """A finished OUTPUT of `rows` rows (skipped when already there)."""
    if (out / "_SUCCESS").exists():
        return
    (out / "scores").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = np.arange(1, EXITS + 1, dtype=np.float32) / (EXITS * (EXITS + 1) / 2)
    for shard, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        exits = rng.normal(size=(n, EXITS)).astype(np.float32)
        quality = (exits @ weights).astype(np.float32)
        status = np.where(rng.random(n) < 0.02, "decode_error", "ok")
        numbers = np.arange(start, start + n)
        ids = np.char.add(np.char.add("img_", np.char.zfill(numbers.astype(str), 10)), ".jpg")
        identity = np.char.add("id", (numbers // 20).astype(str))
        table = build_quality_table(
            {
                "image_id": ids,
                "source": np.char.add("s3://corpus/", ids),
                "identity": identity,
                "status": status,
                "error": np.where(status == "ok", "", "cannot decode"),
                "byte_size": np.full(n, 5000),
                "width": rng.integers(60, 400, n),
                "height": rng.integers(60, 400, n),
                "resized": rng.random(n) < 0.3,
                "exit_scores": exits,
                "quality_final": exits[:, -1],
                "quality_f": exits.mean(1),
                "quality_fw": quality,
                "quality": quality,
                "model_sha256": "bench",
                "run_id": "bench",
                "shard": f"shard-{shard:05d}",
            },
            metadata={"fusion": "fw"},
        )
        pq.write_table(table, out / "scores" / f"shard-{shard:05d}.parquet", compression="zstd")
    (out / "_SUCCESS").write_bytes(b"")


def baseline_site(revision: str, folder: Path) -> Path:
    """A folder that, first on sys.path, makes `fiqa_curator` the code at `revision` (git archive)."""
    tree = folder / f"tree-{revision}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    site = folder / f"site-{revision}" / "fiqa_curator"
    if not site.exists():
        site.mkdir(parents=True)
        for package in ("flows", "workers", "schemas", "evaluation", "demo_kit"):
            (site / package).symlink_to(tree / package)
    return site.parent


def run(command: list[str], site: Path | None) -> tuple[float, float, str]:
    """(seconds, peak RSS in GiB, last output line) of `fiqa COMMAND...` in a fresh process."""
    code = "import sys; from fiqa_curator.flows.cli import main; sys.exit(main(sys.argv[1:]))"
    environment = dict(os.environ)
    if site is not None:
        environment["PYTHONPATH"] = str(site)
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-c", code, *command],
        capture_output=True,
        text=True,
        env=environment,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"fiqa {' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    peak_kib = int(result.stderr.strip().splitlines()[-1])
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return seconds, peak_kib / 2**20, lines[-1][:90] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1000000", help="comma-separated table sizes")
    parser.add_argument("--shard-rows", type=int, default=250_000)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fiqa-report-bench"))
    parser.add_argument("--memory-limit", help="passed to every command (default: theirs)")
    parser.add_argument("--baseline", help="git revision to run side by side")
    parser.add_argument("--baseline-max-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    site = baseline_site(args.baseline, workdir) if args.baseline else None
    limit = ["--memory-limit", args.memory_limit] if args.memory_limit else []
    print(f"{'rows':>11} {'code':>9} {'command':<9} {'seconds':>8} {'peak RSS':>9}  output")
    for rows in (int(r) for r in args.rows.split(",")):
        out = workdir / f"table-{rows}"
        started = time.perf_counter()
        build_table(out, rows, args.shard_rows)
        size = sum(f.stat().st_size for f in (out / "scores").iterdir()) / 2**30
        print(f"# {rows} rows: {size:.2f} GiB of Parquet (ready in {time.perf_counter() - started:.0f} s)")
        commands = {
            "report": ["report", str(out)],
            "select": ["select", str(out), "--drop-fraction", "0.1"],
            "query": ["query", str(out), QUERY, "--limit", "3"],
            "query-id": ["query", str(out), QUERY_BY_ID, "--limit", "3"],
        }
        versions = [("this", None)]
        if site is not None and rows <= args.baseline_max_rows:
            versions.append((args.baseline[:9], site))
        for name, command in commands.items():
            for label, version_site in versions:  # interleaved: the same machine state for both
                # the baseline has no --memory-limit
                seconds, peak, line = run(command + (limit if version_site is None else []), version_site)
                print(f"{rows:>11} {label:>9} {name:<9} {seconds:>8.1f} {peak:>7.2f} G  {line}", flush=True)


if __name__ == "__main__":
    main()
