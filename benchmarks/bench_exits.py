"""Micro-benchmark: one early-exit pass versus the official one-pass-per-exit way.

For a ViT-S-sized random ViT-FIQA (dim 512, depth 12, heads 8, patch 9) at a fixed batch, measures in one
run, side by side:
  1. images/s of a pass that stops at exit depth L and scores every exit 1..L, for L = 1..12, and how that
     compares with the ideal (12/L) x images/s at L = 12;
  2. the time of one 12-exit pass against 12 separate single-exit passes (the official EX-FIQA scripts).
Each measurement is the median of --repeats runs, interleaved so that machine noise hits all alike.

    python benchmarks/bench_exits.py [--batch 64] [--repeats 3] [--mode token] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fiqa_curator.workers import ViTFIQA, ViTFIQAConfig


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="token", choices=["token", "crfiqa", "full"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    config = ViTFIQAConfig.preset("vit_s_qs", mode=args.mode)
    device = torch.device(args.device)
    model = ViTFIQA(config).eval().to(device)
    pixels = torch.randn(args.batch, 3, 112, 112, generator=torch.Generator().manual_seed(0)).to(device)
    depth = config.depth

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_pass(exit_depth: int) -> None:
        model.forward_exits(pixels, exit_depth)
        sync()

    def separate_passes() -> None:
        for exit_index in range(1, depth + 1):
            model.forward_exits(pixels, exit_index, exits=[exit_index])
        sync()

    samples: dict[str, list[float]] = {f"exit_{e}": [] for e in range(1, depth + 1)}
    samples["separate"] = []
    with torch.inference_mode():
        one_pass(2)  # warm-up: allocator, kernels
        for _ in range(args.repeats):
            for exit_depth in range(1, depth + 1):
                samples[f"exit_{exit_depth}"].append(timed(lambda d=exit_depth: one_pass(d)))
            samples["separate"].append(timed(separate_passes))
    median = {key: statistics.median(values) for key, values in samples.items()}

    full_rate = args.batch / median[f"exit_{depth}"]
    print(
        f"ViT-FIQA {args.mode}, dim {config.embed_dim}, depth {depth}, heads {config.num_heads}; "
        f"batch {args.batch}; device {device}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats}"
    )
    print(f"{'exit L':>6} {'GFLOPs/img':>10} {'images/s':>9} {'ideal (12/L)x':>14} {'measured/ideal':>15}")
    rows = []
    for exit_depth in range(1, depth + 1):
        rate = args.batch / median[f"exit_{exit_depth}"]
        ideal = full_rate * depth / exit_depth
        gflops = config.flops_at_exit(exit_depth) / 1e9
        rows.append(
            {
                "exit_depth": exit_depth,
                "gflops": gflops,
                "images_per_s": rate,
                "ideal": ideal,
                "ratio": rate / ideal,
            }
        )
        print(f"{exit_depth:>6} {gflops:>10.2f} {rate:>9.2f} {ideal:>14.2f} {rate / ideal:>15.2f}")
    speedup = median["separate"] / median[f"exit_{depth}"]
    print(
        f"one {depth}-exit pass: {median[f'exit_{depth}']:.2f} s; {depth} separate single-exit passes: "
        f"{median['separate']:.2f} s; speed-up {speedup:.2f}x"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "config": config.to_dict(),
                    "batch": args.batch,
                    "repeats": args.repeats,
                    "device": str(device),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "machine": platform.machine(),
                    "exits": rows,
                    "one_pass_s": median[f"exit_{depth}"],
                    "separate_passes_s": median["separate"],
                    "speedup": speedup,
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
