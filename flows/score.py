"""`fiqa score`: the Prefect flow and its tasks.

    plan (task)      list INPUT, cut the sorted listing into shards, reconcile with OUTPUT's existing plan
    execute (task)   score the pending shards on Ray, committing each as it completes (flows.execution)
    finalize (task)  totals over every committed shard, the run record, then `_SUCCESS` last
    report (task)    OUTPUT/report/index.html and the Prefect artifacts

`score_flow(options)` is the entry point for the command line, the demo, the nightly flow and Python.
"""

from __future__ import annotations

import platform
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from fiqa_curator.flows import timeline
from fiqa_curator.flows.cluster import scoring_device, start_ray, stop_ray
from fiqa_curator.flows.configuration import (
    ModelCheck,
    check_before_start,
    release_model_process,
    resolve_model,
    scoring_config,
    warm_model_process,
)
from fiqa_curator.flows.execution import ExecutionStats, StallError, execute
from fiqa_curator.flows.listing_sort import planning_folder, sort_listing
from fiqa_curator.flows.options import ScoreOptions
from fiqa_curator.flows.plan import (
    Plan,
    committed_shards,
    load_plan,
    make_plan,
    reconcile,
    save_plan,
    saved_listing_fits,
)
from fiqa_curator.flows.sources import IMAGE_EXTENSIONS, InputError, check_input_exists, listing_parts
from fiqa_curator.flows.storage import Output
from fiqa_curator.flows.tar_listing import SavedListing, ShardLister
from fiqa_curator.schemas.layout import (
    LISTING_FILE,
    RUN_FILES,
    SUCCESS_FILE,
    RunRecord,
    StageFigures,
    shard_name,
)
from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT

__all__ = ["RunSummary", "ScoreOptions", "StallError", "score_flow"]
_PRIVATE_STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}  # see score_flow_run
KEEP_MODEL_PROCESS_IMAGES = 20_000  # a run with at most this many images to score keeps it for the report
_STARTED_MODEL_CHECKS: dict[str, ModelCheck] = {}  # started by score_flow before the flow run, by reference


@dataclass
class RunSummary:
    """What a run did, as `score_flow` returns it (the run record's first fields)."""

    output: str
    run_id: str
    counts: dict[str, int]
    total_rows: int
    scored_now: int
    shards_written: int
    shards_skipped: int
    seconds: dict[str, float]
    images_per_second: float
    model_sha256: str
    exit_depth: int
    fusion: str
    uses_demo_model: bool
    report: str | None = None
    carried_over: int = 0


@dataclass
class PlannedRun:
    """The plan task's result: the plan and the shards still to score."""

    plan: Plan
    pending: list[int]


@task(name="plan", cache_policy=NONE)
def plan_task(options: ScoreOptions, config: dict[str, Any]) -> PlannedRun:
    logger = get_run_logger()
    output = Output(options.output, options.storage_options)
    # WebDataset shards: members reused from OUTPUT's saved plan when unchanged, else listed in Ray tasks
    # when big; an unreadable INPUT creates nothing
    tar_lister = ShardLister(lambda: start_ray(options.ray_address), SavedListing.of(output))
    # the listing is spilled to local disk as it is listed and sorted there: the driver never holds it
    with planning_folder() as folder:
        kind, parts = listing_parts(options.input, options.storage_options, tar_lister)
        listing = sort_listing(parts, folder)
        if listing.rows == 0:
            raise InputError(
                f"no images found in INPUT {options.input} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        if tar_lister.reused:
            logger.info(
                "%d of %d tar shards unchanged since the saved plan: not read",
                tar_lister.reused,
                len(tar_lister.shards),
            )
        plan = make_plan(options.input, kind, listing, options.shard_size, config)  # repeated ids fail here
        output.ensure_writable()
        existing = load_plan(output)
        committed = committed_shards(output)
        decision = reconcile(existing, plan, overwrite=options.overwrite, has_results=bool(committed))
        if decision == "fresh":
            for stale in RUN_FILES:
                output.remove(stale)
            committed = set()
            save_plan(output, plan)
        elif existing is not None and not saved_listing_fits(output, existing):
            # planned by older code (plan version 1, or one row group of a million rows): the same items,
            # committed again in the row groups the scoring tasks read
            output.commit_file(LISTING_FILE, plan.listing_file)
        tar_lister.save_index(output, plan.listing_fingerprint)
        # the driver keeps none of the listing: the scoring tasks and --since read OUTPUT's, a group at a time
        plan.listing = None
        plan.listing_file = None  # removed with the folder: the scoring tasks read OUTPUT's
    output.clean_staging()
    pending = [i for i in range(plan.shard_count) if shard_name(i) not in committed]
    if pending:
        output.remove(SUCCESS_FILE)
    logger.info(
        "%s input, %d items, %d shards (%d already committed, %d to score)",
        kind,
        plan.item_count,
        plan.shard_count,
        plan.shard_count - len(pending),
        len(pending),
    )
    return PlannedRun(plan, pending)


@task(name="execute", cache_policy=NONE)
def execute_task(
    options: ScoreOptions,
    planned: PlannedRun,
    config: dict[str, Any],
    checkpoint: str,
    run_id: str,
    on_rows: Callable[[int], None] | None = None,
) -> ExecutionStats:
    return execute(
        options,
        planned.plan,
        planned.pending,
        config,
        checkpoint,
        run_id,
        logger=get_run_logger(),
        on_rows=on_rows,
    )


def _table_totals(output: Output) -> tuple[Counter[str], int]:
    """(rows by status, items) over every committed shard, this run's and earlier ones', counted by DuckDB
    (nothing per row in Python). Each item has exactly one row whose face_index is null or 0 (its only row,
    or its largest face): those count items."""
    from fiqa_curator.flows.table_sql import quality_table

    statuses: Counter[str] = Counter()
    if not output.has_table():
        return statuses, 0
    with quality_table(output) as connection:
        rows = connection.execute(
            "SELECT status, count(*), count(*) FILTER (WHERE coalesce(face_index, 0) = 0) "
            "FROM scores GROUP BY status"
        ).fetchall()
    statuses.update({status: int(count) for status, count, _ in rows})
    return statuses, sum(int(items) for _, _, items in rows)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import prefect
    import ray

    try:
        ours = version("fiqa-curator")
    except PackageNotFoundError:
        ours = "unknown"
    return {
        "fiqa_curator": ours,
        "python": platform.python_version(),
        "torch": version("torch"),  # not imported: the driver never loads torch (flows.configuration)
        "ray": ray.__version__,
        "prefect": prefect.__version__,
        "pyarrow": pa.__version__,
    }


@task(name="finalize", cache_policy=NONE)
def finalize_task(
    options: ScoreOptions,
    planned: PlannedRun,
    config: dict[str, Any],
    run_id: str,
    stats: ExecutionStats,
    timings: dict[str, float],
) -> RunSummary:
    output = Output(options.output, options.storage_options)
    plan = planned.plan
    statuses, items = _table_totals(output)
    if items != plan.item_count:
        raise RuntimeError(f"OUTPUT holds rows for {items} items, {plan.item_count} were planned")
    execute_seconds = timings.get("execute", 0.0)
    summary = RunSummary(
        output=output.full_url(),
        run_id=run_id,
        counts=dict(sorted(statuses.items())),
        total_rows=sum(statuses.values()),
        scored_now=stats.scored,
        shards_written=len(stats.shards),
        shards_skipped=plan.shard_count - len(planned.pending),
        seconds={k: round(v, 3) for k, v in timings.items()},
        images_per_second=round(stats.scored / execute_seconds, 2) if execute_seconds > 0 else 0.0,
        model_sha256=config["model_sha256"],
        exit_depth=config["exit_depth"],
        fusion=config["fusion"],
        uses_demo_model=options.checkpoint is None,
        carried_over=stats.carried,
    )
    output.write_run_record(
        RunRecord(
            **asdict(summary),
            finished_at=datetime.now(UTC).isoformat(),
            input=options.input,
            input_kind=plan.input_kind,
            shard_size=plan.shard_size,
            shard_count=plan.shard_count,
            config=config,
            workers=stats.workers,
            device=stats.device,
            checkpoint=options.checkpoint or str(BUNDLED_CHECKPOINT),
            since=options.since,
            stages=StageFigures(
                write_seconds=round(stats.write_seconds, 3),
                first_batch_seconds=round(stats.first_batch_seconds, 3),
                steady_images_per_second=round(stats.steady_images_per_second, 2),
                rows_by_node=stats.rows_by_node,
                actor_nodes=stats.actor_nodes,
                block_rows=stats.block_rows,
                decoded_on_device=stats.device_decoded,
            ),
            versions=_versions(),
            timeline={**timeline.events(), "finalized": timeline.since_process_start()},
        )
    )
    return summary


@task(name="report", cache_policy=NONE)
def report_task(options: ScoreOptions, summary: RunSummary) -> str:
    """Write OUTPUT/report/index.html and publish the summary as Prefect artifacts under stable keys, so
    nightly runs of the same deployment build a history."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from fiqa_curator.flows.report import write_report

    url, report = write_report(options.output, options.storage_options)
    thresholds = report.get("thresholds", {})
    lines = [
        f"# fiqa-curator: {summary.total_rows} images",
        "",
        f"- output: `{summary.output}`",
        f"- report: [{url}]({url})",
        f"- model sha256: `{summary.model_sha256}`, exit depth {summary.exit_depth}, "
        f"fusion `{summary.fusion}`",
        "",
        "| status | images |",
        "|---|---|",
        *[f"| {status} | {count} |" for status, count in summary.counts.items()],
        "",
        "| quantile | threshold | images dropped |",
        "|---|---|---|",
        *[f"| {q} | {v['threshold']:.4f} | {v['dropped']} |" for q, v in thresholds.items()],
    ]
    create_markdown_artifact(key="fiqa-report", markdown="\n".join(lines), description="fiqa score summary")
    create_table_artifact(
        key="fiqa-status-counts",
        description="images by status",
        table=[{"status": s, "images": n} for s, n in summary.counts.items()],
    )
    return url


@flow(name="fiqa-score", log_prints=False, validate_parameters=False)
def score_flow_run(
    options: ScoreOptions,
    storage_options_ref: str | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> RunSummary:
    """The flow itself. Prefect records flow parameters (in its database, on a real server), and
    credentials must never end up there: storage options stay in this process and the flow receives
    only an opaque reference to them (which also names the model check `score_flow` started early)."""
    if storage_options_ref in _PRIVATE_STORAGE_OPTIONS:
        options = options.model_copy(
            update={"storage_options": _PRIVATE_STORAGE_OPTIONS[storage_options_ref]}
        )
    timeline.mark("flow started")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded, checkpoint = resolve_model(options, _STARTED_MODEL_CHECKS.pop(storage_options_ref or "", None))
    timeline.mark("model checked")
    try:
        device = scoring_device(options.device, options.ray_address, loaded.local_gpu)
        options = options.model_copy(update={"device": device})
        config = scoring_config(loaded, options)
        # the report's attention figure asks the model process (models with a quality token only)
        attention_figure = options.report and loaded.config.mode != "crfiqa"
        if not attention_figure:
            release_model_process()
        del loaded  # actors load their own copy; the driver only needed the checks and the hash
        timings["load_model"] = time.perf_counter() - started

        started = time.perf_counter()
        planned = plan_task(options, config)
        timings["plan"] = time.perf_counter() - started
        timeline.mark("planned")
        # the model process waits, idle, for the report's attention figure through a short run (~0.7 GB,
        # ~3 s less at its end); a longer one lets it go now and starts it again once scoring is over
        to_score = sum(planned.plan.shard_length(index) for index in planned.pending)
        keep_model_process = attention_figure and to_score <= KEEP_MODEL_PROCESS_IMAGES
        if attention_figure and not keep_model_process:
            release_model_process()

        if options.since:  # a PREVIOUS of another configuration fails now, before any work
            from fiqa_curator.flows.incremental import check_previous

            check_previous(Output(options.since, options.storage_options), planned.plan)
        run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        if planned.pending:
            start_ray(options.ray_address)
        started = time.perf_counter()
        stats = execute_task(options, planned, config, checkpoint, run_id, on_rows)
        timings["execute"] = time.perf_counter() - started
        timeline.mark("scored")
        if attention_figure and not keep_model_process:
            warm_model_process(checkpoint, config["model_config"], options.storage_options)
    finally:
        # Ray's processes exit while the run finalizes and writes its report, which need no Ray; the
        # caller's `stop_ray` waits for them
        stop_ray(in_background=True)
    summary = finalize_task(options, planned, config, run_id, stats, timings)
    if options.report:
        try:
            summary.report = report_task(options, summary)
        except (
            Exception
        ) as error:  # the scores are committed and _SUCCESS written: a report bug must not fail them
            get_run_logger().warning(
                "report not written: %s: %s (rerun with `fiqa report`)", type(error).__name__, error
            )
    return summary


def score_flow(options: ScoreOptions, on_rows: Callable[[int], None] | None = None) -> RunSummary:
    """Score every image of INPUT into OUTPUT's quality table; resumes a previous run of the same plan."""
    from fiqa_curator.flows.prefect_server import start_prefect_api_in_background

    timeline.begin_run()
    # a typo in a path or an option fails now, in about a second, not after the ten that Prefect's server,
    # Ray and the model check take to start
    check_before_start(options)
    check_input_exists(options.input, options.storage_options)
    Output(options.output, options.storage_options).check_writable()
    # Prefect's temporary server, started and waited for with a timeout of our own, on a helper thread:
    # Ray starts meanwhile (each takes seconds; `_run.json`'s timeline), unless OUTPUT holds a finished run
    # (a rerun that may have nothing to score: Ray then starts only if it does).
    prefect_api = start_prefect_api_in_background()
    reference = uuid.uuid4().hex
    try:
        # the model is loaded and checked in a child process meanwhile (flows.configuration.ModelCheck)
        # (kept, for the report's attention figure, while the run is short: see after planning)
        _STARTED_MODEL_CHECKS[reference] = ModelCheck(options, keep_for_report=options.report)
        if not _finished(options):
            start_ray(options.ray_address)
        prefect_api.result()
        timeline.mark("prefect ready")
        if options.storage_options:
            _PRIVATE_STORAGE_OPTIONS[reference] = dict(options.storage_options)
        return score_flow_run(options.model_copy(update={"storage_options": {}}), reference, on_rows)
    finally:
        _PRIVATE_STORAGE_OPTIONS.pop(reference, None)
        unused = _STARTED_MODEL_CHECKS.pop(reference, None)
        if unused is not None:  # the flow did not get to it (Prefect failed to start, say)
            unused.close()
        release_model_process()  # kept for a report that did not ask (no quality token, a failed run)
        stop_ray()  # waits for the flow's shutdown in the background, or does it when the flow did not get to


def _finished(options: ScoreOptions) -> bool:
    """Whether OUTPUT holds a finished run (`_SUCCESS`); False when it cannot tell (the plan reports why)."""
    try:
        output = Output(options.output, options.storage_options)
        return bool(output.fs.exists(output.path(SUCCESS_FILE)))
    except Exception:
        return False
