"""End to end at corpus scale on this machine: WebDataset shards on the S3 server, scored, rerun, and a run
killed with `kill -9` halfway then resumed.

    python benchmarks/bench_corpus.py [--tars 1000] [--per-tar 1000] [--exit-depth 2] [--first-only]
                                       [--json F]

1. SeaweedFS on loopback (`tests/s3server.py`), `--tars` shards of `--per-tar` 112x112 JPEG crops with an
   identity each (`bench_scale.upload_webdataset`), credentials through the standard AWS variables.
2. The bare model: the bundled demo model's `QualityScorer.score` on decoded crops at the same exit depth,
   batch 64, every CPU as a torch thread (what the one CPU scoring actor gets), each in a fresh process:
   with the default allocator and with the scoring actor's settings (`workers.allocator`).
3. `fiqa score s3://corpus/wds s3://corpus/out-a --exit-depth L` as a process: its whole time, the driver's
   peak RSS (the `fiqa` process alone, sampled every 0.5 s) and the run record's figures.
4. The same command again: exit status 0 and nothing scored.
5. The same job into out-b, killed (`kill -9`, the whole process group) once half of its shards are
   committed; the committed shards' bytes hashed; the same command again.
Then both tables are checked (the script fails otherwise): exactly one row per image (tars x per-tar ids,
each once), the rerun scoring nothing, and out-b's shards committed before the kill untouched.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' S3 server helper
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scale import _face_crops, upload_webdataset  # noqa: E402

from tests.s3server import start_s3_server  # noqa: E402


def bare_rate(exit_depth: int, seconds: float = 20.0) -> float:
    """Images/s of the bundled model alone on decoded crops, as the scoring actor runs it."""
    import torch

    from fiqa_curator.workers import QualityScorer, decode_face, load_model
    from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT
    from fiqa_curator.workers.scoring import CPU_BATCH_SIZE

    torch.set_num_threads(os.cpu_count() or 1)
    scorer = QualityScorer(load_model(BUNDLED_CHECKPOINT), device="cpu", batch_size=CPU_BATCH_SIZE)
    crops = np.stack([decode_face(blob).image for blob in _face_crops(CPU_BATCH_SIZE)])
    scorer.score(crops, exit_depth=exit_depth)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        scorer.score(crops, exit_depth=exit_depth)
        done += len(crops)
    return done / (time.perf_counter() - started)


def bare_rate_in_child(exit_depth: int, keep_buffers: bool) -> float:
    """`bare_rate` in a fresh process, with the scoring actor's allocator settings (`workers.allocator`: they
    hold from a process's start) or the default: the two references the pipeline is compared with."""
    from fiqa_curator.workers.allocator import large_buffer_environment

    done = subprocess.run(
        [sys.executable, __file__, "--bare-child", str(exit_depth)],
        capture_output=True,
        text=True,
        env={**os.environ, **(large_buffer_environment() if keep_buffers else {})},
        timeout=600,
    )
    if done.returncode:
        raise SystemExit(f"the bare model failed: {done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


RSS_PARTS = ("RssAnon", "RssFile", "RssShmem")
TRACE_EVERY_S = 10.0


def rss_parts(pid: int) -> dict[str, int]:
    """The kernel's split of a process's RSS, in kB (/proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {part: int(fields[part].split()[0]) for part in RSS_PARTS}


def fiqa(args: list[str], env: dict, kill_when: Callable[[], bool] | None = None) -> dict:
    """Run `fiqa ARGS` in its own process group (killed with SIGKILL once `kill_when()` holds): its seconds,
    exit status, driver peak RSS, whether it was killed, and the tail of its output."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "fiqa"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    driver = psutil.Process(process.pid)
    peak, killed = 0, False
    parts = dict.fromkeys(RSS_PARTS, 0)  # each part's own peak
    trace: list[list[float]] = []  # [seconds, anon MB, file MB, shmem MB] every TRACE_EVERY_S: growth shows
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, killed
        while not done.is_set():
            with contextlib.suppress(psutil.Error, OSError):
                peak = max(peak, driver.memory_info().rss)
                now = rss_parts(process.pid)
                for part, kb in now.items():
                    parts[part] = max(parts[part], kb * 1024)
                seconds = time.perf_counter() - started
                if not trace or seconds - trace[-1][0] >= TRACE_EVERY_S:
                    trace.append([round(seconds, 1), *(round(now[part] / 1024) for part in RSS_PARTS)])
            if kill_when is not None and not killed and kill_when():
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    printed = process.communicate()[0]
    done.set()
    sampler.join()
    return {
        "seconds": time.perf_counter() - started,
        "returncode": process.returncode,
        "driver_peak_rss_mb": peak / 2**20,
        # RSS = the process's own memory (anon) + mapped files (libraries: torch, Ray) + pages of Ray's
        # object store it read batches from (shmem: the store's memory, shared with every worker)
        **{f"driver_peak_{part.lower()}_mb": value / 2**20 for part, value in parts.items()},
        "rss_trace": trace,
        "killed": killed,
        "tail": printed[-1500:],
    }


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tars", type=int, default=1000)
    parser.add_argument("--per-tar", type=int, default=1000)
    parser.add_argument("--exit-depth", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument(
        "--first-only",
        action="store_true",
        help="score once and check the table (no rerun, no kill -9): the driver's memory at several sizes",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import s3fs

    images = args.tars * args.per_tar
    report: dict = {"tars": args.tars, "images": images, "exit_depth": args.exit_depth}
    report["cpus"] = os.cpu_count()
    report["bare_images_per_s"] = bare_rate_in_child(args.exit_depth, keep_buffers=False)
    report["bare_actor_allocator_images_per_s"] = bare_rate_in_child(args.exit_depth, keep_buffers=True)
    print(report, flush=True)
    with tempfile.TemporaryDirectory() as work:
        server = start_s3_server(Path(work) / "s3")
        try:
            options = server.storage_options
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
            fs.mkdir("corpus")
            started = time.perf_counter()
            report["tar_bytes"] = upload_webdataset(fs, "corpus/wds", args.tars, args.per_tar)
            report["upload_s"] = time.perf_counter() - started
            env = dict(
                os.environ,
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                AWS_ACCESS_KEY_ID=options["key"],
                AWS_SECRET_ACCESS_KEY=options["secret"],
                AWS_ENDPOINT_URL=options["client_kwargs"]["endpoint_url"],
                AWS_DEFAULT_REGION="us-east-1",
            )
            common = ["--exit-depth", str(args.exit_depth), "--shard-size", str(args.shard_size)]
            common += ["--no-progress", "--no-report", "--device", "cpu"]
            shards = -(-images // args.shard_size)

            def score(out: str, **kwargs) -> dict:
                run = fiqa(["score", "s3://corpus/wds", f"s3://corpus/{out}", *common], env, **kwargs)
                print(out, {k: v for k, v in run.items() if k != "tail"}, flush=True)
                return run

            def committed(out: str) -> list[str]:
                return sorted(p for p in fs.find(f"corpus/{out}/scores") if p.endswith(".parquet"))

            def record(out: str) -> dict:
                return json.loads(fs.cat(f"corpus/{out}/_run.json"))

            def table_check(out: str) -> dict:
                dataset = ds.dataset(f"corpus/{out}/scores", filesystem=fs, format="parquet")
                ids = dataset.to_table(columns=["image_id"]).column("image_id")
                return {"rows": len(ids), "distinct_ids": pc.count_distinct(ids).as_py()}

            first = score("out-a")
            assert first["returncode"] == 0, first["tail"]
            run = record("out-a")
            report["first"] = {
                **{k: v for k, v in first.items() if k != "tail"},
                "images_per_s": run["images_per_second"],
                "steady_images_per_s": run["stages"]["steady_images_per_second"],
                "vs_bare": run["images_per_second"] / report["bare_images_per_s"],
                "steady_vs_bare": run["stages"]["steady_images_per_second"] / report["bare_images_per_s"],
                "steady_vs_bare_actor_allocator": run["stages"]["steady_images_per_second"]
                / report["bare_actor_allocator_images_per_s"],
                "whole_command_images_per_s": images / first["seconds"],
                "seconds": run["seconds"],
                "timeline": run.get("timeline", {}),
                "counts": run["counts"],
                **table_check("out-a"),
            }
            if args.first_only:
                return _finish(report, args, images)
            again = score("out-a")
            assert again["returncode"] == 0, again["tail"]
            report["rerun"] = {
                **{k: v for k, v in again.items() if k != "tail"},
                "scored_now": record("out-a")["scored_now"],
                "seconds": record("out-a")["seconds"],
            }

            killed = score("out-b", kill_when=lambda: len(committed("out-b")) >= shards // 2)
            assert killed["killed"], killed["tail"]
            before = {p: hashlib.sha256(fs.cat(p)).hexdigest() for p in committed("out-b")}
            resumed = score("out-b")
            assert resumed["returncode"] == 0, resumed["tail"]
            after = {p: hashlib.sha256(fs.cat(p)).hexdigest() for p in committed("out-b")}
            run = record("out-b")
            report["killed_and_resumed"] = {
                "committed_at_kill": len(before),
                "shards": shards,
                "killed_after_s": killed["seconds"],
                "resume": {k: v for k, v in resumed.items() if k != "tail"},
                "resume_skipped": run["shards_skipped"],
                "resume_written": run["shards_written"],
                "committed_shards_untouched": all(after.get(p) == h for p, h in before.items()),
                **table_check("out-b"),
            }
        finally:
            server.stop()
    return _finish(report, args, images)


def _finish(report: dict, args: argparse.Namespace, images: int) -> dict:
    """Print the report, fail unless every table holds each image once (and the rerun scored nothing,
    and the kill left committed shards untouched), and save it with --json."""
    print(json.dumps(report, indent=1))
    for name in ("first", "killed_and_resumed"):
        if name in report:
            assert report[name]["rows"] == report[name]["distinct_ids"] == images, (name, report[name])
    if "rerun" in report:
        assert report["rerun"]["scored_now"] == 0, report["rerun"]
        assert report["killed_and_resumed"]["committed_shards_untouched"], report["killed_and_resumed"]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare-child"]:
        print(bare_rate(int(sys.argv[2])))
    else:
        main()
