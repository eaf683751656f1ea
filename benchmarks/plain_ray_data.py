"""What a competent engineer would write instead of `fiqa score`: the same job as a plain Ray Data script.

Reads the images (`read_binary_files`), decodes them in light tasks, scores them with a callable class on an
actor pool (the package's Python API: `load_model`, `QualityScorer`, `decode_face`), writes Parquet. No plan,
no resume, no per-shard commits, no run record, no Prefect: the yardstick for fiqa's overhead
(`bench_pipeline.py --plain` times both as whole processes, interleaved).

    python benchmarks/plain_ray_data.py INPUT_FOLDER OUTPUT_FOLDER --checkpoint model.pt --arch vit_s_qs \
        --exit-depth 4 --batch-size 64 --threads 2
"""

import argparse

import numpy as np
import ray
import torch

from fiqa_curator.workers import QualityScorer, decode_face, load_model


def decode(batch: dict) -> dict:
    faces = [decode_face(data) for data in batch["bytes"]]
    blank = np.zeros((112, 112, 3), np.uint8)
    return {
        "path": batch["path"],
        "status": np.array([face.status for face in faces]),
        "image": np.stack([face.image if face.ok else blank for face in faces]),
    }


class Scorer:
    def __init__(self, checkpoint: str, arch: str, exit_depth: int, batch_size: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.scorer = QualityScorer(load_model(checkpoint, arch), device="cpu", batch_size=batch_size)
        self.exit_depth = exit_depth

    def __call__(self, batch: dict) -> dict:
        result = self.scorer.score(batch["image"], exit_depth=self.exit_depth)
        ok = batch["status"] == "ok"
        return {
            "path": batch["path"],
            "status": batch["status"],
            "quality": np.where(ok, result.quality, np.nan),
            "exit_scores": list(np.where(ok[:, None], result.exit_scores, np.nan)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--arch", default=None)
    parser.add_argument("--exit-depth", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    (
        ray.data.read_binary_files(args.input, include_paths=True)
        .map_batches(decode, batch_size=args.batch_size, num_cpus=0.25)
        .map_batches(
            Scorer,
            fn_constructor_kwargs={
                "checkpoint": args.checkpoint,
                "arch": args.arch,
                "exit_depth": args.exit_depth,
                "batch_size": args.batch_size,
                "threads": args.threads,
            },
            batch_size=args.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=1,
        )
        .write_parquet(args.output)
    )


if __name__ == "__main__":
    main()
