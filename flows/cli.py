"""The `fiqa` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def _cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import NOTICE, run_demo

    console.print(f"[bold yellow]{NOTICE}[/]")
    result = run_demo(Path(args.output), count=args.images, exit_depth=args.exit_depth, fusion=args.fusion)
    primary = f"quality_{args.fusion}" if args.fusion in ("f", "fw", "final") else "quality_w"
    table = Table(title=f"{len(result.rows)} files scored (lowest {primary} first; failures last)")
    for column in ("image_id", "status", primary, "exit_1", "resized"):
        table.add_column(column)
    ranked = sorted(result.rows, key=lambda r: (r[primary] is None, r[primary] or 0.0))
    for row in ranked[:5] + ranked[-4:]:
        value = row[primary]
        table.add_row(
            row["image_id"], row["status"] if row["status"] == "ok" else f"[red]{row['status']}[/]",
            "-" if value is None else f"{value:.4f}",
            "-" if row["exit_1"] is None else f"{row['exit_1']:.4f}", str(row["resized"]),
        )
    console.print(table)
    counts = ", ".join(f"{status}: {n}" for status, n in sorted(result.counts.items()))
    console.print(f"statuses: {counts}; {result.seconds:.1f} s")
    console.print(f"quality table: {result.output / 'scores.csv'}\nrun record:    {result.output / 'run.json'}")
    console.print("[bold yellow]Reminder: random model, generated images; see README 'Status'.[/]")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from workers import load_model

    loaded = load_model(args.checkpoint, args.model_config or args.arch,
                        storage_options=json.loads(args.storage_options) if args.storage_options else None)
    config = loaded.config
    info = {**loaded.describe(), "ignored_keys": list(loaded.ignored_keys),
            "gflops_per_image": {str(e): round(config.flops_at_exit(e) / 1e9, 4) for e in range(1, config.depth + 1)}}
    console.print_json(json.dumps(info))
    return 0


def _cmd_check_reference(args: argparse.Namespace) -> int:
    """Compare this installation against official reference outputs (a fixture folder or a parent)."""
    import numpy as np

    from workers import QualityScorer, load_model

    root = Path(args.folder)
    folders = [root] if (root / "model.pt").is_file() else sorted(p.parent for p in root.glob("*/model.pt"))
    if not folders:
        console.print(f"[red]no reference folders (with model.pt) under {root}[/]")
        return 2
    failed = False
    for folder in folders:
        scorer = QualityScorer(load_model(folder / "model.pt"), device=args.device, precision="fp32")
        images = np.load(folder / "images_rgb_uint8.npy")
        result = scorer.score(images, embeddings=True)
        checks = {
            "block_quality": (result.exit_scores, np.load(folder / "expected_block_quality.npy")),
            "quality": (result.fused["final"], np.load(folder / "expected_quality.npy").reshape(-1)),
            "embedding": (result.embedding, np.load(folder / "expected_embedding.npy")),
        }
        for name, (ours, expected) in checks.items():
            ok = bool(np.allclose(ours, expected, atol=2e-5, rtol=1e-3))
            failed |= not ok
            verdict = "[green]match[/]" if ok else "[red]MISMATCH[/]"
            console.print(f"{folder.name:>16} {name:>14}: max |diff| {np.abs(ours - expected).max():.2e}  {verdict}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiqa",
        description="Score and curate face datasets with ViT-FIQA and EX-FIQA early exits.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the embedded default job (offline, no arguments needed)")
    demo.add_argument("--output", default="fiqa-output/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--images", type=int, default=24, help="generated images (default: %(default)s)")
    demo.add_argument("--exit-depth", type=int, default=None, help="exit depth L (default: model depth)")
    demo.add_argument("--fusion", default="fw", help="fw | f | final | w1,...,wL (default: %(default)s)")
    demo.set_defaults(handler=_cmd_demo)

    inspect = commands.add_parser("inspect", help="load a checkpoint and print its architecture and cost")
    inspect.add_argument("checkpoint", help="model.pt: local path or fsspec URL (s3://...)")
    source = inspect.add_mutually_exclusive_group()
    source.add_argument("--arch", help="preset: vit_s_qs | vit_b_qs")
    source.add_argument("--model-config", help="JSON config (mode, img_size, patch_size, embed_dim, ...)")
    inspect.add_argument("--storage-options", help="fsspec storage options as JSON")
    inspect.set_defaults(handler=_cmd_inspect)

    check = commands.add_parser("check-reference", help="compare against official ViT-FIQA reference outputs")
    check.add_argument("folder", help="a reference folder (model.pt, images_rgb_uint8.npy, expected_*.npy) or parent")
    check.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    check.set_defaults(handler=_cmd_check_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    from workers import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
