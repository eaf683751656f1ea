"""Scoring a plan's pending shards on Ray: the Ray Data pipeline, the stall watchdog, and the rows carried
over from a previous run (`--since`).

    a description per pending shard -> read_shards (light CPU tasks, one per shard: the shard's items
        read from the plan's listing saved in OUTPUT, their bytes read and decoded) -> ScoreStage actor pool
        -> batches back on the driver -> ShardWriter (each shard committed when its last row arrives)

The driver hands Ray one small row per shard, not the items: what it does before scoring grows with the
shards, not the images. `--since` (`carry_over`) goes through the listings shard by shard, a row group at
a time (`incremental.carry_by_shard`); a shard carried over in part names its images still to score, and
its carried rows wait in a local file (`ShardWriter.add_carried`) until the rest arrive.

`execute` returns what happened as an `ExecutionStats`; the flow (`flows.score`) turns it into the run
record.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fiqa_curator.flows import timeline
from fiqa_curator.flows.cluster import (
    ActorPlacement,
    actor_placement,
    cpu_node_count,
    json_console_logs,
    placement_nodes,
    spread_cpu_actors,
)
from fiqa_curator.flows.listing_sort import planning_folder
from fiqa_curator.flows.options import ScoreOptions
from fiqa_curator.flows.plan import Plan, shard_task, shard_tasks
from fiqa_curator.flows.shard_writer import ShardWriter
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import StallError
from fiqa_curator.schemas.layout import LISTING_FILE, shard_name
from fiqa_curator.workers.allocator import large_buffer_environment
from fiqa_curator.workers.io import protocol_of
from fiqa_curator.workers.settings import CPU_BATCH_SIZE

# Rows per Ray Data block on GPU with an automatic batch size; the actor splits them by memory.
GPU_BLOCK_ROWS = 1024
ROW_SLACK_BYTES = 1024  # an encoded row's columns besides its bytes (ids, URL, status): --decode device
ENCODED_CROP_BYTES = 4096  # a 112x112 JPEG crop, about (docs/benchmarks.md)
PLACEMENT_WAIT_S = 120  # for one-actor-per-node placement (milliseconds on an idle cluster)
# Ray Data's per-block records an operator keeps for `Dataset.stats()` (`forget_block_stats`): at most this
# many per operator.
KEPT_BLOCK_STATS = 1000


@dataclass
class ExecutionStats:
    """What scoring the pending shards did (all zeros when nothing was pending)."""

    scored: int = 0  # rows scored now
    carried: int = 0  # items carried over from --since
    shards: list[str] = field(default_factory=list)  # shards committed by this run
    seconds: float = 0.0
    first_batch_seconds: float = 0.0  # start-up: actors spawned, model loaded, first batch through
    steady_images_per_second: float = 0.0  # the rate once running
    write_seconds: float = 0.0
    workers: int | None = None
    device: str | None = None
    rows_by_node: dict[str, int] = field(default_factory=dict)
    actor_nodes: list[str] = field(default_factory=list)
    block_rows: int | None = None
    device_decoded: int = 0


def watched(batches: Iterator[Any], stall_timeout: float | None) -> Iterator[Any]:
    """Yield from `batches` (consumed on a helper thread) but raise StallError when none arrives for
    `stall_timeout` seconds. A cluster that lost nodes can be left unable to schedule work (Ray waits for
    resources forever); at 3 a.m. a failed run that the next attempt resumes beats a hung one."""
    if not stall_timeout:
        yield from batches
        return
    inbox: queue.Queue = queue.Queue(maxsize=4)
    done = object()

    def pump() -> None:
        try:
            for batch in batches:
                inbox.put(batch)
            inbox.put(done)
        except BaseException as error:  # handed to the consumer, raised there
            inbox.put(error)

    threading.Thread(target=pump, name="fiqa-batches", daemon=True).start()
    while True:
        try:
            item = inbox.get(timeout=stall_timeout)
        except queue.Empty:
            raise StallError(
                f"no scored batch for {stall_timeout:g} s (--stall-timeout): the cluster may have "
                "lost the resources it needs; committed shards are kept, rerun to resume"
            ) from None
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def carry_over(
    options: ScoreOptions, plan: Plan, pending: list[int], writer: ShardWriter
) -> tuple[list[dict[str, Any]], int]:
    """--since: hand the writer PREVIOUS's rows of the unchanged images of the `pending` shards, shard by
    shard (`incremental.carry_by_shard`); returns the shard tasks left to score (a shard carried in part
    names its images still to score) and how many images were carried."""
    from fiqa_curator.flows.incremental import carry_by_shard

    assert options.since is not None
    previous = Output(options.since, options.storage_options)
    listing = (
        plan.listing
        if plan.listing is not None
        else Output(options.output, options.storage_options).full_url(LISTING_FILE)
    )
    tasks: list[dict[str, Any]] = []
    carried = 0
    for shard in carry_by_shard(previous, plan, pending, listing, options.storage_options):
        if shard.carried:
            writer.add_carried(shard_name(shard.index), shard.rows, shard.carried)
            carried += shard.carried
        if shard.carried < shard.items:
            tasks.append(shard_task(plan, shard.index, shard.to_score if shard.carried else None))
    return tasks, carried


def execute(
    options: ScoreOptions,
    plan: Plan,
    pending: list[int],
    config: dict[str, Any],
    checkpoint: str,
    run_id: str,
    *,
    logger: logging.Logger | logging.LoggerAdapter,
    on_rows: Callable[[int], None] | None = None,
) -> ExecutionStats:
    """Score the pending shards (after carrying over what `--since` allows) and commit each as it
    completes."""
    json_console_logs()  # before Ray Data logs anything
    started = time.perf_counter()
    if not pending:
        return ExecutionStats()
    # the local folder where --since's carried rows wait; a run killed with kill -9 leaves its folder,
    # which the next run on this host removes (`planning_folder`)
    with planning_folder() as folder:
        writer = ShardWriter(
            Output(options.output, options.storage_options),
            plan,
            pending,
            run_id=run_id,
            config=config,
            local_folder=folder,
        )
        try:
            return _execute(options, plan, pending, config, checkpoint, writer, logger, on_rows, started)
        finally:
            writer.close()


def _execute(
    options: ScoreOptions,
    plan: Plan,
    pending: list[int],
    config: dict[str, Any],
    checkpoint: str,
    writer: ShardWriter,
    logger: logging.Logger | logging.LoggerAdapter,
    on_rows: Callable[[int], None] | None,
    started: float,
) -> ExecutionStats:
    import ray
    from ray.data import DataContext

    if options.since:
        tasks, carried = carry_over(options, plan, pending, writer)
        if carried:
            logger.info("carried over %d unchanged images from %s", carried, options.since)
    else:
        tasks, carried = shard_tasks(plan, pending), 0
    if not tasks:  # everything was carried over: nothing for Ray to do
        return ExecutionStats(
            carried=carried,
            shards=list(writer.committed),
            seconds=time.perf_counter() - started,
            write_seconds=writer.write_seconds,
        )

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    placement = actor_placement(
        ray.cluster_resources(),
        device=options.device,
        workers=options.workers,
        gpus_per_worker=options.gpus_per_worker,
    )
    group = spread_cpu_actors(placement, cpu_node_count())
    if group is not None and not group.wait(PLACEMENT_WAIT_S):
        # The nodes counted are busy with other work, or one went away: better actors placed as Ray can
        # than a run that waits for a placement that may never come.
        logger.warning(
            "the %d scoring actors could not be placed one per node within %d s; Ray places them as it can",
            placement.workers,
            PLACEMENT_WAIT_S,
        )
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)
        group = None
    try:
        with decoded_block_size(_block_rows(options, placement), config):
            stats = _score_on_ray(
                options,
                plan,
                tasks,
                config,
                checkpoint,
                placement,
                group,
                writer,
                carried,
                logger,
                on_rows,
                started,
            )
    finally:
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
    stats.seconds = time.perf_counter() - started
    return stats


def _block_rows(options: ScoreOptions, placement: ActorPlacement) -> int:
    """Rows per Ray Data block: the batch size, or on GPU with an automatic batch size GPU_BLOCK_ROWS."""
    return options.batch_size or (GPU_BLOCK_ROWS if placement.gpu else CPU_BATCH_SIZE)


def listing_source(output: Output) -> Any:
    """Where the reading tasks read the saved listing: OUTPUT's URL when every node can read it (an
    object store, or a local OUTPUT on a one-node cluster, the driver's); else, a local OUTPUT on a
    cluster of several nodes, its bytes put once in Ray's object store (about 35 bytes per image)."""
    import numpy as np
    import ray

    if protocol_of(output.url) != "file" or len([n for n in ray.nodes() if n["Alive"]]) <= 1:
        return output.full_url(LISTING_FILE)
    data = output.read_bytes(LISTING_FILE)
    if data is None:
        raise RuntimeError(f"the plan's listing is missing: {output.full_url(LISTING_FILE)}")
    return ray.put(np.frombuffer(data, dtype=np.uint8))


@contextmanager
def decoded_block_size(block_rows: int, config: Mapping[str, Any]) -> Iterator[None]:
    """Ray Data's target block size set to about `block_rows` decoded rows while the pipeline runs (its
    default, 128 MiB, would join a shard of 1,000 crops into one block, scored by one actor while the
    others wait; with --decode device a row carries an encoded crop instead of pixels); restored after,
    for a long-lived process that runs other Ray Data work."""
    from ray.data import DataContext

    if config["decode"] == "device":  # encoded crops vary in size: an estimate
        target = block_rows * (ENCODED_CROP_BYTES + ROW_SLACK_BYTES)
    else:
        # The pixels alone: a decoded row is its pixels plus a few hundred bytes of ids and status, so a
        # block of `block_rows` is just above the target and Ray Data passes it on as it is (it cuts a
        # block only at 1.5x the target). A target just above the block's bytes made it wait for the next
        # block and cut the two at 66 rows: the actor scored batches of 64, 2, 64, 2 (3% of the rate at
        # exit 4, docs/benchmarks.md).
        target = block_rows * 3 * config["model_config"]["img_size"] ** 2
    context = DataContext.get_current()
    previous = context.target_max_block_size
    context.target_max_block_size = target
    try:
        yield
    finally:
        context.target_max_block_size = previous


def _pipeline(
    options: ScoreOptions,
    tasks: list[dict[str, Any]],
    listing: Any,
    listing_key: str,
    config: dict[str, Any],
    checkpoint: str,
    placement: ActorPlacement,
    group: Any | None,
    block_rows: int,
) -> Any:
    """The Ray Data dataset: shard descriptions -> read_shards (light CPU tasks) -> ScoreActor pool."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from fiqa_curator.flows.shard_reading import read_shards

    gpus = placement.gpu
    # A fractional CPU: reading is mostly waiting on storage, and a resource request unlike the actor's
    # keeps Ray from fusing the reading and scoring stages, so decoding overlaps with the model instead of
    # preceding it. With --align, reading also detects and warps faces: real CPU work, a whole CPU.
    reading_cpus = 1 if config["align"] else 0.25
    # One task per shard (`shard_reading`): it reads the shard's items from the saved listing, then their
    # bytes, and yields decoded blocks of `block_rows` (the target block size set by the caller keeps Ray
    # Data from joining them into one block that one actor would score while the others wait).
    dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=reading_cpus,
        fn_kwargs={
            "listing": listing,
            "key": listing_key,
            "storage_options": options.storage_options,
            "block_rows": block_rows,
            "read_options": {
                "options_protocol": protocol_of(options.input),
                "max_pixels": options.max_pixels,
                "align": config["align"],
                "img_size": config["model_config"]["img_size"],
                "defer_jpeg": config["decode"] == "device",
            },
        },
    )
    actor_options = (
        {"scheduling_strategy": PlacementGroupSchedulingStrategy(group)} if group is not None else {}
    )
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing `scheduling_strategy` to map_batches (to be removed in 2.64; the pinned
        # Ray is 2.60) and offers no named parameter for it yet; the two-node test fails when that changes.
        warnings.filterwarnings(
            "ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning
        )
        return dataset.map_batches(
            ScoreStage,
            batch_size=block_rows,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=placement.workers),
            num_gpus=placement.gpus_per_worker,
            num_cpus=0 if gpus else 1,
            runtime_env=actor_runtime_env(gpus),
            **actor_options,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "config": config["model_config"],
                "storage_options": options.storage_options,
                "device": "cuda" if gpus else "cpu",
                "exit_depth": config["exit_depth"],
                "fusion": config["fusion"],
                "batch_size": options.batch_size or ("auto" if gpus else CPU_BATCH_SIZE),
                "threads": placement.threads,
                "expected_sha256": config["model_sha256"],
                "embeddings": config["embeddings"],
                "precision": config["precision"],
                "memory_share": min(1.0, placement.gpus_per_worker) if gpus else 1.0,
                "max_pixels": options.max_pixels,
            },
        )


def actor_runtime_env(gpus: bool) -> dict[str, Any] | None:
    """The scoring actors' Ray runtime environment: on CPU, the forward pass's large buffers kept in the
    actor's heap (`workers.allocator`: set when the process starts, hence an environment variable)."""
    return None if gpus else {"env_vars": large_buffer_environment()}


def forget_block_stats(dataset: Any) -> int:
    """Drop the records Ray Data keeps of every block each operator has output, once an operator holds more
    than KEPT_BLOCK_STATS; returns how many were dropped.

    Why: a running dataset's map operators keep a `BlockStats` per output block for `Dataset.stats()` until
    the execution ends, about 2.7 KB each. With CPU blocks of 64 rows that is 86 MB of the driver's memory
    per million images, growing through the run (8.6 GB at 100M; blocks of 1,024 rows on GPUs make it
    0.5 GB): docs/benchmarks.md. fiqa reads none of it (its figures are its own). Ray offers no setting
    for this, so this reaches a private attribute (`MapOperator._output_blocks_stats`, Ray 2.60); when a
    Ray upgrade renames it this drops nothing and test_analysts_read_the_table_with_duckdb fails."""
    executor = getattr(dataset, "_current_executor", None)
    dropped = 0
    for operator in getattr(executor, "_topology", None) or ():
        records = getattr(operator, "_output_blocks_stats", None)
        if isinstance(records, list) and len(records) > KEPT_BLOCK_STATS:
            dropped += len(records)
            records.clear()  # one call under the GIL: the executor's thread only appends to it
    return dropped


class ScoreStage:
    """The scoring actor as Ray Data runs it: `workers.stages.ScoreActor`, imported in the actor's process,
    so that the driver, which only names the class, never imports torch."""

    def __init__(self, **kwargs: Any) -> None:
        from fiqa_curator.workers.stages import ScoreActor

        self._actor = ScoreActor(**kwargs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self._actor(batch)


def _score_on_ray(
    options: ScoreOptions,
    plan: Plan,
    tasks: list[dict[str, Any]],
    config: dict[str, Any],
    checkpoint: str,
    placement: ActorPlacement,
    group: Any | None,
    writer: ShardWriter,
    carried: int,
    logger: logging.Logger | logging.LoggerAdapter,
    on_rows: Callable[[int], None] | None,
    started: float,
) -> ExecutionStats:
    """Run the pipeline and hand every batch to the writer as it arrives (`started`: when the execution
    began, for the start-up figure)."""
    device = "cuda" if placement.gpu else "cpu"
    block_rows = _block_rows(options, placement)
    listing = listing_source(Output(options.output, options.storage_options))
    dataset = _pipeline(
        options, tasks, listing, plan.listing_fingerprint, config, checkpoint, placement, group, block_rows
    )
    logger.info(
        "scoring %d images on %d %s actor(s)",
        sum(writer.missing().values()),
        placement.workers,
        "GPU" if placement.gpu else "CPU",
    )
    scored, first_count = 0, 0
    first_batch_at: float | None = None
    timeline.mark("pipeline built")  # Ray Data starts the actors when the first batch is asked for
    for batch in watched(dataset.iter_batches(batch_format="numpy", batch_size=None), options.stall_timeout):
        forget_block_stats(dataset)
        writer.add(batch)
        count = len(batch["image_id"])
        scored += count
        if first_batch_at is None:
            first_batch_at, first_count = time.perf_counter(), count
            timeline.mark("first batch")
        if on_rows:
            on_rows(count)
    missing = writer.missing()
    if missing:
        raise RuntimeError(f"rows missing after scoring, shards not committed: {missing}")
    finished = time.perf_counter()
    running = finished - first_batch_at if first_batch_at else 0.0
    return ExecutionStats(
        scored=scored,
        carried=carried,
        shards=list(writer.committed),
        first_batch_seconds=(first_batch_at or finished) - started,
        steady_images_per_second=(scored - first_count) / running if running > 0 else 0.0,
        write_seconds=writer.write_seconds,
        workers=placement.workers,
        device=device,
        rows_by_node=dict(writer.rows_by_node),
        block_rows=block_rows,
        actor_nodes=placement_nodes(group) if group is not None else sorted(writer.rows_by_node),
        device_decoded=writer.device_decoded,
    )
