"""Report generation on a large quality table: time and peak memory of `fiqa report`, in its own process.

Writes N rows (default 1,000,000; 12 exits, 2% failures, 5,000 identities) as 10 shards, then runs
`fiqa report` under /usr/bin/time and prints the wall time and the peak RSS. The report reads only the
columns it shows.

    python benchmarks/bench_report.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fiqa_curator.schemas import build_quality_table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=10)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fiqa-report-bench-")) / "out"
    (out / "scores").mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_shard = args.rows // args.shards
    for shard in range(args.shards):
        exits = rng.normal(size=(per_shard, 12)).astype(np.float32)
        quality = (exits @ np.arange(1, 13, dtype=np.float32) / 78).astype(np.float32)
        status = np.where(rng.random(per_shard) < 0.02, "decode_error", "ok")
        ids = [f"s{shard:02d}/img_{i:07d}.jpg" for i in range(per_shard)]
        table = build_quality_table(
            {
                "image_id": ids,
                "source": ids,
                "identity": [f"id{i % 5000}" for i in range(per_shard)],
                "status": status,
                "error": np.where(status == "ok", "", "broken"),
                "byte_size": np.full(per_shard, 5000),
                "width": np.full(per_shard, 112),
                "height": np.full(per_shard, 112),
                "resized": np.zeros(per_shard, bool),
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
        pq.write_table(table, out / "scores" / f"shard-{shard:05d}.parquet")
    fiqa = str(Path(sys.executable).parent / "fiqa")
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", fiqa, "report", str(out)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)
    peak_kib = int(result.stderr.strip().splitlines()[-1])
    print(
        f"{args.rows} rows, {args.shards} shards: report in {seconds:.1f} s, "
        f"peak RSS {peak_kib / 2**20:.2f} GiB "
        f"({(out / 'report' / 'index.html').stat().st_size / 1e6:.1f} MB page)"
    )


if __name__ == "__main__":
    main()
