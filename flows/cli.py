"""The `fiqa` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fiqa_curator.flows.options import (
    DEFAULT_MEMORY_SHARE,
    add_score_arguments,
    add_serve_arguments,
    parse_storage_options,
)
from fiqa_curator.schemas.errors import StallError, UserError
from fiqa_curator.schemas.status import Status

console = Console(highlight=False)

SCORE_DESCRIPTION = """\
Score every image of INPUT with ViT-FIQA at exit depth L (one pass per image, exits 1..L) and write
OUTPUT/scores/shard-*.parquet: one row per input, bad inputs included with a status and a reason.

A rerun with the same INPUT listing and configuration resumes: committed shards are skipped. A rerun
with another configuration refuses to mix results unless --overwrite. s3:// works with the standard AWS
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION).

exit status: 0 the job completed (even with bad inputs); 2 it could not run, with one line saying why (bad
checkpoint or config, unreadable INPUT, unwritable OUTPUT, conflicting plan); 1 the run stalled
(--stall-timeout: the same command resumes it) or a bug (its traceback is shown).

example:
  fiqa score s3://bucket/faces/ s3://bucket/quality/2026-11-29/ --checkpoint s3://models/vitfiqa_token.pt \\
      --arch vit_s_qs --exit-depth 6 --fusion fw
"""


def _progress(disable: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=disable,
    )


def _print_summary(summary) -> None:
    counts = ", ".join(f"{status} {n}" for status, n in summary.counts.items())
    console.print(f"[bold]done[/]: {summary.total_rows} images ({counts})")
    carried = f"carried over {summary.carried_over} unchanged image(s); " if summary.carried_over else ""
    console.print(
        f"{carried}scored now: {summary.scored_now} in {summary.shards_written} shard(s), "
        f"{summary.shards_skipped} shard(s) already committed; "
        f"{summary.images_per_second} images/s; exit depth {summary.exit_depth}, fusion {summary.fusion}"
    )
    console.print(f"quality table: {summary.output}/scores/   run record: {summary.output}/_run.json")
    if summary.report:
        console.print(f"report: {summary.report}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from fiqa_curator.flows.demo import HEAVY, NOTICE, median_by_degradation, run_demo

    console.print(f"[bold]{NOTICE}[/]")
    with _progress() as progress:
        bar = progress.add_task("scoring", total=None)
        result = run_demo(
            Path(args.output),
            exit_depth=args.exit_depth,
            fusion=args.fusion,
            faces=args.faces,
            raw=not args.no_raw,
            evaluate=not args.no_evaluate,
            on_rows=lambda n: progress.update(bar, advance=n),
            log=lambda line: console.print(line),
        )
    _print_summary(result.summary)
    table = Table(
        title=f"median `quality` ({result.summary.fusion}, exit depth {result.summary.exit_depth}) "
        "by degradation and severity (0 = clean)"
    )
    severities, medians = median_by_degradation(result.rows)
    table.add_column("degradation")
    for severity in severities:
        table.add_column(str(severity), justify="right")
    for kind, values in medians.items():
        table.add_row(kind, *("-" if value is None else f"{value:+.3f}" for value in values))
    console.print(table)
    sep = result.separation
    console.print(
        f"[bold]clean vs heavily degraded (severity {HEAVY})[/]: "
        f"median quality {sep['clean_median']:+.3f} vs {sep['heavy_median']:+.3f}; "
        "a clean face outscores a heavily degraded one in "
        f"{100 * sep['clean_above_heavy']:.1f}% of pairs; Spearman with the FR utility "
        f"{sep['spearman_utility']:.3f} ({sep['images']} images)"
    )
    if result.evaluation and "advisor" in result.evaluation:
        advisor = result.evaluation["advisor"]
        chosen, best = advisor["recommended"], advisor["best"]
        saved = f", saving {chosen['compute_saved']:.0%} of the compute" if "compute_saved" in chosen else ""
        console.print(
            f"[bold]evaluation[/] (EDC against dlib's face recogniser, FMR {advisor['operating_point']}, "
            f"pAUC lower is better): best {best['option']} {best['pauc']:.4f}; advisor: exit depth "
            f"{chosen['exit_depth']} with {chosen['option']} ({chosen['pauc']:.4f}){saved}"
        )
    if result.identities is not None:
        found = result.identities
        by_severity = ", ".join(
            f"{severity}: {outliers}/{total}"
            for severity, (outliers, total) in sorted(result.outliers_by_severity.items())
        )
        console.print(
            f"[bold]identities[/] (dlib's embeddings, centres weighted by quality): {found.identities} "
            f"identities; {found.outliers} images look more like someone else than like their own identity "
            f"(by severity {by_severity}); {found.duplicates} near-duplicates of a better copy; "
            f"{found.merge_candidates} merge candidates -> fiqa identities, fiqa select --drop-outliers"
        )
    if result.raw_summary is not None:
        raw = Table(
            title="raw photographs scored with --align --all-faces (one row per face; nothing dropped)"
        )
        for column in ("image_id", "status", "faces", "face_confidence", "quality"):
            raw.add_column(column)
        for row in result.raw_rows:
            raw.add_row(
                row["image_id"],
                row["status"] if row["status"] == Status.OK else f"[red]{row['status']}[/]",
                "-" if row["faces"] is None else str(row["faces"]),
                "-" if row["face_confidence"] is None else f"{row['face_confidence']:.2f}",
                "-" if row["quality"] is None else f"{row['quality']:+.3f}",
            )
        console.print(raw)
    out = result.output
    console.print(
        f"look at: report {out / 'quality' / 'report' / 'index.html'}   "
        f"table {out / 'quality' / 'scores'}/   "
        f"data {out / 'data'} (manifest.csv: degradation, severity, utility)"
    )
    console.print(
        "next: fiqa query " + str(out / "quality") + ' "select status, count(*) from scores group by 1"   '
        "|  fiqa score --help"
    )
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from fiqa_curator.demo_kit.build import build_sample_set

    severities = args.severities
    manifest = build_sample_set(
        Path(args.output),
        split=args.split,
        severities=severities,
        max_faces=args.faces,
        seed=args.seed,
        log=lambda line: console.print(line),
    )
    console.print(f"score it: fiqa score {manifest} OUTPUT")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fiqa_curator.flows.evaluate import run_evaluation, tie_warnings

    result, written, output_url = run_evaluation(
        args.quality,
        args.pairs,
        embeddings=args.embeddings,
        protocol=args.protocol,
        fmrs=args.fmr,
        discard_limit=args.discard_limit,
        threshold=args.threshold,
        starting_error=args.starting_error,
        methods=[m.strip() for m in args.methods.split(",")] if args.methods else None,
        tolerance=args.tolerance,
        advise_fmr=args.advise_fmr,
        fit_fusion=args.fit_fusion,
        output=args.output,
        storage_options=parse_storage_options(args.storage_options),
    )
    if written and not args.json:
        console.print(f"wrote {', '.join(written)} to {output_url}")
    if args.json:
        print(json.dumps(result))
        return 0
    console.print(
        f"{args.protocol}: {result['pairs_used']} of {result['pairs']} pairs used "
        f"({result['pairs_dropped']} without a quality score or an embedding)"
    )
    points = list(next(iter(result["methods"].values())))
    table = Table(title=f"pAUC up to {args.discard_limit:g} discarded (lower is better)")
    table.add_column("method")
    for point in points:
        table.add_column(f"FMR {point}" if args.protocol == "erc" or point[0].isdigit() else point)
    for name, per_point in sorted(result["methods"].items(), key=lambda kv: kv[1][points[0]]["pauc"]):
        table.add_row(name, *(f"{per_point[p]['pauc']:.4f}" for p in points))
    console.print(table)
    for line in tie_warnings(result):
        console.print(line, style="yellow", markup=False, soft_wrap=True)
    if "fusion_fit" in result:
        fit = result["fusion_fit"]
        held = fit["heldout_pauc"]
        console.print(
            f"fitted fusion (held-out pAUC {held['fitted']:.4f}; F {held['f']:.4f}, FW {held['fw']:.4f}): "
            f"--fusion {fit['fusion']}"
        )
    if "advisor" in result:
        advice = result["advisor"]["recommended"]
        saved = f", saves {advice['compute_saved']:.0%} of the compute" if "compute_saved" in advice else ""
        console.print(
            f"advisor ({result['advisor']['operating_point']}): exit depth {advice['exit_depth']} with "
            f"{advice['option']} (pAUC {advice['pauc']:.4f}, within {args.tolerance:.0%} of the best, "
            f"{result['advisor']['best']['option']}){saved}"
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """Serve the nightly deployment: registers it with the Prefect server and runs its scheduled runs."""
    import prefect

    from fiqa_curator.flows.nightly import nightly_deployment
    from fiqa_curator.flows.options import serve_parameters
    from fiqa_curator.flows.prefect_server import ensure_prefect_api

    parameters: dict = {"incremental": not args.no_incremental}
    scoring = serve_parameters(args)  # checked now (a UserError naming the flag), not at 2 a.m.
    if scoring:
        parameters["scoring"] = scoring
    deployment = nightly_deployment(
        args.input,
        args.output_root,
        cron=args.cron,
        timezone=args.timezone,
        name=args.name,
        collision=args.collision,
        parameters=parameters,
    )
    configured = prefect.settings.PREFECT_API_URL.value()
    api = ensure_prefect_api()  # before serving: a slow temporary server must not fail the runner
    console.print(
        f"serving deployment fiqa-nightly/{args.name}: cron '{args.cron}' ({args.timezone}), one run at a "
        f"time ({args.collision} when busy), {args.input} -> {args.output_root}/<date>/",
        soft_wrap=True,
    )
    console.print(
        f"Prefect server: {api}{'' if configured else ' (temporary: schedules end with this process)'}; "
        "trigger a run now: prefect deployment run fiqa-nightly/" + args.name,
        soft_wrap=True,
    )
    prefect.serve(deployment, print_starting_message=False)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fiqa_curator.flows.report import write_report

    url, summary = write_report(
        args.output, parse_storage_options(args.storage_options), memory_limit=args.memory_limit
    )
    console.print(f"report: {url} ({summary['rows']} images)")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from fiqa_curator.flows.curation import select

    selection = select(
        args.output,
        drop_fraction=args.drop_fraction,
        min_quality=args.min_quality,
        by=args.by,
        drop_outliers=args.drop_outliers,
        drop_duplicates=args.drop_duplicates,
        min_identity_images=args.min_identity_images,
        storage_options=parse_storage_options(args.storage_options),
        memory_limit=args.memory_limit,
    )
    threshold = "none (nothing dropped)" if selection.threshold is None else f"{selection.threshold:.6g}"
    console.print(f"{selection.rule}; threshold {threshold}")
    identity = (
        f", {selection.dropped_outliers} identity outliers, {selection.dropped_duplicates} near-duplicates, "
        f"{selection.dropped_small_identities} of identities left too small"
        if args.drop_outliers or args.drop_duplicates or args.min_identity_images is not None
        else ""
    )
    console.print(
        f"keep {selection.kept}, drop {selection.dropped_low_quality} for quality{identity} and "
        f"{selection.dropped_unscored} that could not be scored -> {selection.output}/keep.parquet, "
        f"drop.parquet, selection.json"
    )
    return 0


def _cmd_identities(args: argparse.Namespace) -> int:
    from fiqa_curator.flows.identities import find_identities

    summary = find_identities(
        args.output,
        embeddings=args.embeddings,
        by=args.by,
        outlier_similarity=args.outlier_similarity,
        duplicate_similarity=args.duplicate_similarity,
        merge_similarity=args.merge_similarity,
        outlier_margin=args.outlier_margin,
        all_rivals=args.all_rivals,
        weighted=not args.unweighted,
        storage_options=parse_storage_options(args.storage_options),
        memory_limit=args.memory_limit,
    )
    thresholds = summary.thresholds
    console.print(
        f"{summary.images} images in {summary.identities} identities ({summary.usable} with a score and an "
        f"embedding from {summary.embeddings}); images without an identity, left out: "
        f"{summary.without_identity}"
    )
    for name in ("outlier", "margin", "stranger", "duplicate", "merge"):
        value = getattr(thresholds, name)
        shown = "" if value is None else f"{value:.4f}: "  # the source of an unset one says "off: why"
        console.print(f"  {name} threshold {shown}{thresholds.source[name]}")
    console.print(
        f"{summary.below_similarity} images below the outlier similarity; "
        f"{summary.below_similarity - summary.outliers} of them nearer their own centre than their rival's "
        "by the margin"
    )
    console.print(
        f"outliers {summary.outliers}, near-duplicates {summary.duplicates}, kept {summary.kept}; "
        f"merge candidates {summary.merge_candidates} identities ({summary.nearest_method} search) -> "
        f"{summary.output}/identity_images.parquet, identities.parquet, identities.json"
    )
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from fiqa_curator.flows.query import preview, query_to

    storage = parse_storage_options(args.storage_options)
    if args.out:
        rows = query_to(args.output, args.sql, args.out, storage, memory_limit=args.memory_limit)
        console.print(f"{rows} rows -> {args.out}")
        return 0
    table, rows = preview(args.output, args.sql, storage, limit=args.limit, memory_limit=args.memory_limit)
    shown = Table(title=f"{rows} rows" + (f" (first {args.limit})" if rows > args.limit else ""))
    for name in table.column_names:
        shown.add_column(name)
    for row in table.to_pylist():  # `preview` returns at most --limit rows
        shown.add_row(
            *("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values())
        )
    console.print(shown)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fiqa_curator.workers import load_model

    loaded = load_model(
        args.checkpoint,
        args.model_config or args.arch,
        storage_options=parse_storage_options(args.storage_options),
    )
    config = loaded.config
    info = {
        **loaded.describe(),
        "ignored_keys": list(loaded.ignored_keys),
        "gflops_per_image": {
            str(e): round(config.flops_at_exit(e) / 1e9, 4) for e in range(1, config.depth + 1)
        },
    }
    console.print_json(json.dumps(info))
    return 0


def _cmd_check_reference(args: argparse.Namespace) -> int:
    """Compare this installation against official reference outputs (a fixture folder or a parent)."""
    import numpy as np

    from fiqa_curator.workers import QualityScorer, load_model

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
            console.print(
                f"{folder.name:>16} {name:>14}: max |diff| {np.abs(ours - expected).max():.2e}  {verdict}"
            )
    return 1 if failed else 0


def _cmd_score(args: argparse.Namespace) -> int:
    import logging

    from fiqa_curator.flows.options import options_from_args
    from fiqa_curator.flows.score import score_flow

    options = options_from_args(args)
    if options.checkpoint is None:
        console.print(
            "[bold yellow]No --checkpoint: using the bundled DEMO model (small, trained on CPU on package "
            "faces; a demonstration, not for production: workers/assets/demo/MODEL_CARD.md).[/]"
        )
    logging.getLogger("ray").setLevel(logging.WARNING)
    with _progress(disable=args.no_progress) as progress:
        bar = progress.add_task("scoring", total=None)
        summary = score_flow(options, on_rows=lambda n: progress.update(bar, advance=n))
    _print_summary(summary)
    return 0


def _numbers(kind: type) -> Callable[[str], tuple]:
    """An argparse type: comma-separated numbers (a bad one is a usage error, exit status 2)."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    return parse


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run the embedded default job (offline, no arguments needed)")
    demo.add_argument("--output", default="fiqa-output/demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--faces", type=int, default=None, help="use only this many held-out faces (default: all 15)"
    )
    demo.add_argument("--exit-depth", type=int, default=None, help="exit depth L (default: model depth)")
    demo.add_argument("--fusion", default="fw", help="fw | f | final | w1,...,wL (default: %(default)s)")
    demo.add_argument("--no-raw", action="store_true", help="skip scoring the raw photographs with --align")
    demo.add_argument(
        "--no-evaluate", action="store_true", help="skip the EDC evaluation against dlib's recogniser"
    )
    demo.set_defaults(handler=_cmd_demo)


def _add_demo_data(commands: Any) -> None:
    demo_data = commands.add_parser(
        "demo-data",
        help="build the sample dataset: package faces, aligned, degraded, with an FR utility target",
    )
    demo_data.add_argument(
        "output", metavar="OUT", help="folder to write (images/, manifest.csv, pairs.parquet, ...)"
    )
    demo_data.add_argument(
        "--split",
        choices=["test", "train", "all"],
        default="test",
        help="test: the 15 faces held out from the demo model's training (default)",
    )
    demo_data.add_argument("--faces", type=int, help="at most this many faces")
    demo_data.add_argument(
        "--severities",
        type=_numbers(int),
        default="1,2,3,4,5",
        help="severities to write (default: %(default)s)",
    )
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(handler=_cmd_demo_data)


def _add_score(commands: Any) -> None:
    score = commands.add_parser(
        "score",
        help="score every image of INPUT into a Parquet quality table in OUTPUT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=SCORE_DESCRIPTION,
    )
    add_score_arguments(score)
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(handler=_cmd_score)


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="run the nightly scoring deployment on a schedule (Prefect), until stopped"
    )
    serve.add_argument("input", metavar="INPUT", help="what to score every night (any fsspec URL)")
    serve.add_argument("output_root", metavar="OUTPUT_ROOT", help="each run writes OUTPUT_ROOT/<YYYY-MM-DD>/")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule (default: %(default)s)")
    serve.add_argument(
        "--timezone", default="UTC", help="time zone of the schedule and the dates (default: UTC)"
    )
    serve.add_argument("--name", default="nightly", help="deployment name (default: %(default)s)")
    serve.add_argument(
        "--collision",
        choices=["enqueue", "cancel-new"],
        default="enqueue",
        help="a run triggered while one runs: wait for it, or be cancelled (default: %(default)s)",
    )
    serve.add_argument("--no-incremental", action="store_true", help="score everything every night")
    add_serve_arguments(serve)
    serve.set_defaults(handler=_cmd_serve)


def _add_evaluate(commands: Any) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="EDC curves and pAUC of quality scores against face-recognition comparisons"
    )
    evaluate.add_argument(
        "--quality",
        required=True,
        help="a fiqa OUTPUT folder (every exit + fusions) or a Parquet/CSV with image_id + methods",
    )
    evaluate.add_argument("--pairs", required=True, help="Parquet/CSV with image_id_a, image_id_b, genuine")
    evaluate.add_argument(
        "--embeddings",
        help="Parquet with image_id, embedding (any FR model; cosine similarity); "
        "default: the quality table's own `embedding` column (fiqa score --embeddings)",
    )
    evaluate.add_argument(
        "--protocol",
        choices=["erc", "iso"],
        default="erc",
        help="erc: CR-FIQA/EX-FIQA papers; iso: Schlett et al. FNM-EDC (default: %(default)s)",
    )
    evaluate.add_argument(
        "--fmr",
        type=_numbers(float),
        default="1e-2,1e-3,1e-4",
        help="operating points (default: %(default)s)",
    )
    evaluate.add_argument(
        "--discard-limit", type=float, default=0.3, help="pAUC limit (default: %(default)s)"
    )
    evaluate.add_argument("--threshold", type=float, help="iso: fixed similarity threshold")
    evaluate.add_argument(
        "--starting-error", type=float, help="iso: threshold as this quantile of genuine scores"
    )
    evaluate.add_argument("--methods", help="comma-separated subset of the quality columns")
    evaluate.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="advisor: pAUC within this fraction of the best option (default: %(default)s)",
    )
    evaluate.add_argument(
        "--advise-fmr",
        type=float,
        default=1e-3,
        help="advisor: the operating point it decides on (default: %(default)s)",
    )
    evaluate.add_argument("--storage-options", help="fsspec options as JSON")
    evaluate.add_argument("--json", action="store_true", help="print the machine-readable result")
    evaluate.add_argument(
        "--fit-fusion",
        action="store_true",
        help="fit non-negative exit weights on half of the images' pairs, report them on the other "
        "half against F and FW, and print the --fusion value that uses them",
    )
    evaluate.add_argument(
        "--output",
        help="folder (any fsspec URL) for result.json, curves.parquet, summary.parquet and the plots",
    )
    evaluate.set_defaults(handler=_cmd_evaluate)


def _add_memory_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="memory DuckDB may use before it spills to a temporary folder (TMPDIR): 4GB, 512MiB or 25%% "
        f"of this machine (default: {DEFAULT_MEMORY_SHARE * 100:.0f}%%)",
    )


def _add_report(commands: Any) -> None:
    report = commands.add_parser("report", help="write OUTPUT/report/index.html, a self-contained page")
    report.add_argument("output", metavar="OUTPUT", help="a fiqa score OUTPUT (local or URL)")
    report.add_argument("--storage-options", help="fsspec options as JSON")
    _add_memory_limit(report)
    report.set_defaults(handler=_cmd_report)


def _add_select(commands: Any) -> None:
    select = commands.add_parser("select", help="keep/drop lists from a quality table")
    select.add_argument("output", metavar="OUTPUT", help="a fiqa score OUTPUT (local or URL)")
    rule = select.add_mutually_exclusive_group()
    rule.add_argument(
        "--drop-fraction", type=float, help="drop this fraction of the scored images, lowest first"
    )
    rule.add_argument("--min-quality", type=float, help="drop scored images below this quality")
    select.add_argument(
        "--by", default="quality", help="quality | quality_fw | quality_f | quality_final | exit_<k>"
    )
    select.add_argument(
        "--drop-outliers", action="store_true", help="drop identity outliers (from `fiqa identities`)"
    )
    select.add_argument(
        "--drop-duplicates",
        action="store_true",
        help="drop near-duplicates within an identity but the best-quality copy (from `fiqa identities`)",
    )
    select.add_argument(
        "--min-identity-images",
        type=int,
        metavar="N",
        help="drop identities left with fewer than N images after every other rule",
    )
    select.add_argument("--storage-options", help="fsspec options as JSON")
    _add_memory_limit(select)
    select.set_defaults(handler=_cmd_select)


def _add_identities(commands: Any) -> None:
    identities = commands.add_parser(
        "identities",
        help="outliers, near-duplicates and merge candidates per identity, weighted by quality",
        description="Compare every image with its identity's quality-weighted centre; write "
        "OUTPUT/curation/identity_images.parquet, identities.parquet and identities.json. Thresholds "
        "left unset are derived from the data (README: Identities).",
    )
    identities.add_argument("output", metavar="OUTPUT", help="a fiqa score OUTPUT (local or URL)")
    identities.add_argument(
        "--embeddings",
        metavar="FILE",
        help="Parquet (file or folder, any fsspec URL) with image_id and embedding from any face-recognition "
        "model; default: the quality table's own `embedding` column (fiqa score --embeddings)",
    )
    identities.add_argument(
        "--by",
        default="quality",
        help="the score that weighs the centres: quality | quality_f | ... | exit_<k>",
    )
    for name, meaning in (
        (
            "outlier",
            "an image below this cosine similarity to its identity's centre is an outlier unless it is "
            "nearer its own centre than its rival's by --outlier-margin",
        ),
        ("duplicate", "two images of an identity at or above this cosine similarity are near-duplicates"),
        ("merge", "identities whose centres reach this cosine similarity are merge candidates"),
    ):
        identities.add_argument(
            f"--{name}-similarity", type=float, metavar="COSINE", help=f"{meaning} (default: derived)"
        )
    identities.add_argument(
        "--outlier-margin",
        type=float,
        metavar="DIFFERENCE",
        help="an image below the outlier similarity stays an outlier only while its similarity to its own "
        "centre minus that to its rival (the nearest other person's centre) is below this (default: "
        "derived; 2 turns the rival test off)",
    )
    identities.add_argument(
        "--all-rivals",
        action="store_true",
        help="find the rival of every usable image, not only of those below the outlier similarity (a "
        "search per image: slower on large tables)",
    )
    identities.add_argument(
        "--unweighted", action="store_true", help="every image counts the same in its centre (to compare)"
    )
    identities.add_argument("--storage-options", help="fsspec options as JSON")
    _add_memory_limit(identities)
    identities.set_defaults(handler=_cmd_identities)


def _add_query(commands: Any) -> None:
    query = commands.add_parser("query", help="SQL (DuckDB) over a quality table, as the view `scores`")
    query.add_argument("output", metavar="OUTPUT", help="a fiqa score OUTPUT (local or URL)")
    query.add_argument("sql", help='e.g. "SELECT status, count(*) FROM scores GROUP BY status"')
    query.add_argument(
        "--out", help="write the result to this .csv or .parquet (local or URL) instead of printing"
    )
    query.add_argument("--limit", type=int, default=50, help="rows to print (default: %(default)s)")
    query.add_argument("--storage-options", help="fsspec options as JSON")
    _add_memory_limit(query)
    query.set_defaults(handler=_cmd_query)


def _add_inspect(commands: Any) -> None:
    inspect = commands.add_parser("inspect", help="load a checkpoint and print its architecture and cost")
    inspect.add_argument("checkpoint", help="model.pt: local path or fsspec URL (s3://...)")
    source = inspect.add_mutually_exclusive_group()
    source.add_argument("--arch", help="preset: vit_s_qs | vit_b_qs")
    source.add_argument("--model-config", help="JSON config (mode, img_size, patch_size, embed_dim, ...)")
    inspect.add_argument("--storage-options", help="fsspec storage options as JSON")
    inspect.set_defaults(handler=_cmd_inspect)


def _add_check_reference(commands: Any) -> None:
    check = commands.add_parser("check-reference", help="compare against official ViT-FIQA reference outputs")
    check.add_argument(
        "folder", help="a reference folder (model.pt, images_rgb_uint8.npy, expected_*.npy) or parent"
    )
    check.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    check.set_defaults(handler=_cmd_check_reference)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiqa",
        description="Score and curate face datasets with ViT-FIQA and EX-FIQA early exits.",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="logs (stderr) as one JSON object per line, for log collectors; default: plain text",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_demo_data(commands)
    _add_score(commands)
    _add_serve(commands)
    _add_evaluate(commands)
    _add_report(commands)
    _add_select(commands)
    _add_identities(commands)
    _add_query(commands)
    _add_inspect(commands)
    _add_check_reference(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before Prefect is imported: its temporary server's analytics only add a noisy "database is locked".
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    if args.log_json:  # Prefect reads its logging settings when it is first imported: set them before
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER"] = "json"
        os.environ["FIQA_LOG_FORMAT"] = "json"  # flows.cluster.init_ray: Ray's logs as JSON too
    try:
        return args.handler(args)
    except (UserError, FileNotFoundError) as error:  # the user can fix it: one line, no traceback
        console.print(f"[red]error:[/] {error}", soft_wrap=True)  # whole lines: greppable, copyable
        return 2
    except StallError as error:  # the run started and stopped making progress: rerunning resumes it
        console.print(f"[red]failed:[/] {error}", soft_wrap=True)
        return 1
    # anything else is a bug: its traceback shows (exit status 1), so that a report carries what fixes it


if __name__ == "__main__":
    sys.exit(main())
