"""`fiqa score`: the Prefect flow that plans, scores on Ray Data, and commits Parquet shards.

plan (task)    list INPUT, cut the sorted listing into shards, reconcile with OUTPUT's existing plan
execute (task) Ray Data: read+decode as CPU tasks -> ScoreActor pool -> the driver commits each shard
               as soon as all its rows arrived (written under _staging, then moved into scores/)
finalize (task) totals over every committed shard, `_run.json`, then `_SUCCESS` last
"""

from __future__ import annotations

import io
import json
import os
import platform
import queue
import threading
import time
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.plan import (
    LISTING_FILE,
    PLAN_FILE,
    Plan,
    committed_shards,
    load_plan,
    make_plan,
    reconcile,
    save_plan,
    shard_name,
)
from flows.sources import IMAGE_EXTENSIONS, InputError, discover, items_to_table
from flows.storage import Output
from schemas import SCHEMA_VERSION, build_quality_table
from workers import ViTFIQAConfig, load_model
from workers.assets import BUNDLED_CHECKPOINT
from workers.checkpoint import LoadedModel
from workers.fusion import parse_fusion
from workers.io import protocol_of
from workers.preprocess import DEFAULT_MAX_PIXELS
from workers.reading import ALIGN_MODES
from workers.scoring import CPU_BATCH_SIZE

RUN_FILE = "_run.json"
GPU_BLOCK_ROWS = 1024  # rows per Ray Data block on GPU with an automatic batch size; the actor splits by memory
DECODE_PLACES = ("cpu", "device")
_PRIVATE_STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}  # see score_flow_run
SUCCESS_FILE = "_SUCCESS"
LOG_FORMAT_ENV = "FIQA_LOG_FORMAT"  # "json": set by `fiqa --log-json`


@dataclass
class ScoreOptions:
    """Everything `fiqa score` can be told; the CLI maps its flags one to one."""

    input: str
    output: str
    checkpoint: str | None = None
    model_config: str | None = None
    arch: str | None = None
    mode: str | None = None
    exit_depth: int | None = None
    fusion: str = "fw"
    batch_size: int | None = None  # None: 64 on CPU; on GPU blocks of GPU_BLOCK_ROWS, model batches sized by memory
    shard_size: int = 1000
    workers: int | None = None
    device: str = "auto"
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    ray_address: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    embeddings: bool = False
    report: bool = True
    align: str | None = None  # None: inputs are aligned crops; "largest" / "all": raw photos, detect + align
    since: str | None = None  # a previous OUTPUT: carry over the rows of unchanged images (flows.incremental)
    gpus_per_worker: float = 1.0  # a fraction lets several scoring actors share one GPU
    stall_timeout: float | None = 1800.0  # fail (not hang) when no batch arrives for this long; None: wait
    precision: str = "auto"  # fp32 | bf16 | auto (bf16 on GPU, fp32 on CPU); part of the configuration fingerprint
    decode: str = "cpu"  # cpu | device: plain JPEG crops decoded by the scoring actor (nvJPEG on GPU)


@dataclass
class RunSummary:
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


# ---- model and configuration --------------------------------------------------------------------------
def resolve_model(options: ScoreOptions) -> tuple[LoadedModel, str]:
    """Load the model once on the driver: bad checkpoints and configs fail here, before any work."""
    checkpoint = options.checkpoint or str(BUNDLED_CHECKPOINT)
    arch: Any = options.model_config
    if options.mode and not options.arch:
        raise ValueError("--mode goes with --arch (a preset); a JSON config states its own mode")
    if options.arch:
        arch = ViTFIQAConfig.preset(options.arch, mode=options.mode) if options.mode else options.arch
    return load_model(checkpoint, arch, storage_options=options.storage_options), checkpoint


def scoring_device(device: str, address: str | None) -> tuple[str, bool]:
    """("cpu" | "cuda", whether Ray was started): where the actors will score. Decided before planning
    because "auto" precision, which is part of the configuration, depends on it. A cluster named by
    address is asked for its GPUs (joining it now); a local run looks at this machine. An autoscaling
    cluster with no GPU node up yet reads as CPU: pass --device cuda there."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device != "auto":
        return device, False
    if address or os.environ.get("RAY_ADDRESS"):
        started = init_ray(address)
        import ray

        return ("cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"), started
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu"), False


def scoring_config(loaded: LoadedModel, options: ScoreOptions) -> dict[str, Any]:
    """What the numbers depend on: the fingerprint of this decides whether results may be mixed.
    `options.device` must be resolved ("cpu" or "cuda"; `scoring_device`): it decides "auto" precision."""
    exit_depth = options.exit_depth or loaded.config.depth
    if not 1 <= exit_depth <= loaded.config.depth:
        raise ValueError(f"--exit-depth must be in 1..{loaded.config.depth}, got {exit_depth}")
    if options.embeddings and exit_depth != loaded.config.depth:
        raise ValueError(f"--embeddings needs the full depth ({loaded.config.depth}): the embedding is the output "
                         f"of the whole model, and exit depth {exit_depth} stops before it")
    if options.align not in (None, *ALIGN_MODES):
        raise ValueError(f"align must be one of {', '.join(ALIGN_MODES)}, got {options.align!r}")
    if options.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {options.precision!r}")
    if options.decode not in DECODE_PLACES:
        raise ValueError(f"--decode must be one of {', '.join(DECODE_PLACES)}, got {options.decode!r}")
    if options.decode == "device" and options.align:
        raise ValueError("--decode device is for aligned crops; with --align photos are decoded where faces are found")
    if options.precision == "auto" and options.device not in ("cpu", "cuda"):
        raise ValueError("resolve the device (scoring_device) before the configuration: auto precision depends on it")
    precision = ("bf16" if options.device == "cuda" else "fp32") if options.precision == "auto" else options.precision
    fusion = parse_fusion(options.fusion)
    weights = fusion.weights(exit_depth)  # rejects a wrong number of user weights now
    return {
        "model_sha256": loaded.sha256,
        "model_config": loaded.config.to_dict(),
        "exit_depth": exit_depth,
        "fusion": str(fusion),
        "fusion_weights": [round(float(w), 12) for w in weights],
        "max_pixels": options.max_pixels,
        "schema_version": SCHEMA_VERSION,
        "embeddings": options.embeddings,
        "align": options.align,
        # bf16 moves scores by up to a few percent of their spread, nvJPEG pixels by a level or two: a run
        # must not resume or carry over rows computed the other way
        "precision": precision,
        "decode": options.decode,
    }


# ---- Ray ---------------------------------------------------------------------------------------------
def init_ray(address: str | None) -> bool:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local Ray bound to loopback.
    Returns True when this call started Ray (the caller then shuts it down)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost"):
        # Every Ray socket on 127.0.0.1 (ENVIRONMENT notes), and for a cluster on loopback the driver looks
        # for its raylet there. Ray reads this when it is imported: set it first.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return False
    log_options: dict[str, Any] = {"logging_level": "WARNING"}
    if os.environ.get(LOG_FORMAT_ENV) == "json":  # fiqa --log-json: Ray's driver and worker logs as JSON too
        log_options = {"logging_config": ray.LoggingConfig(encoding="JSON", log_level="WARNING")}
    if address:
        ray.init(address=address, log_to_driver=False, **log_options)
    else:
        # address="local": always a private cluster; a bare ray.init() would join any Ray already running
        # on this machine (`ray start`, another job), and hang if that one goes away.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **log_options)
    return True


def json_console_logs() -> None:
    """With `fiqa --log-json`, Ray's and Ray Data's console lines on this driver in Prefect's JSON format
    (Ray Data installs its own text handler when imported). Ray's C++ core still writes its rare error
    lines in its own (glog) format: it does not go through Python logging."""
    if os.environ.get(LOG_FORMAT_ENV) != "json":
        return
    import logging

    from prefect.logging.formatters import JsonFormatter

    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setFormatter(JsonFormatter("default", None, None))


# ---- tasks ---------------------------------------------------------------------------------------------
@task(name="plan", cache_policy=NONE)
def plan_task(options: ScoreOptions, config: dict[str, Any]) -> tuple[Plan, list[int]]:
    logger = get_run_logger()
    kind, items = discover(options.input, options.storage_options)  # an unreadable INPUT creates nothing
    if not items:
        raise InputError(f"no images found in INPUT {options.input} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    output = Output(options.output, options.storage_options)
    output.ensure_writable()
    plan = make_plan(options.input, kind, items, options.shard_size, config)
    existing = load_plan(output)
    committed = committed_shards(output)
    decision = reconcile(existing, plan, overwrite=options.overwrite, has_results=bool(committed))
    if decision == "fresh":
        for stale in ("scores", PLAN_FILE, LISTING_FILE, RUN_FILE, SUCCESS_FILE):
            output.remove(stale)
        committed = set()
        save_plan(output, plan)
    output.clean_staging()
    pending = [i for i in range(plan.shard_count) if shard_name(i) not in committed]
    if pending:
        output.remove(SUCCESS_FILE)
    logger.info("%s input, %d items, %d shards (%d already committed, %d to score)",
                kind, plan.item_count, plan.shard_count, plan.shard_count - len(pending), len(pending))
    return plan, pending


class ShardWriter:
    """Collects scored rows per shard on the driver and commits a shard the moment it is complete.

    A shard is complete when every one of its items delivered all its rows (`item_rows`: one, or one per
    face with `--align all`). Rows are keyed by image_id, so a row delivered twice (a retried Ray task) is
    written once."""

    BOOKKEEPING = ("scored_on", "item_id", "item_rows", "device_decoded")  # carried by batches, not table columns

    def __init__(self, output: Output, plan: Plan, pending: list[int], *, run_id: str, config: Mapping[str, Any]):
        self.output = output
        self.config_fingerprint = plan.config_fingerprint
        self.run_id = run_id
        self.config = config
        self.expected = {shard_name(i): len(plan.shard_items(i)) for i in pending}
        # shard -> item_id -> image_id -> row
        self.rows: dict[str, dict[str, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
        self.complete_items: Counter[str] = Counter()
        self.committed: dict[str, None] = {}  # ordered set
        self.write_seconds = 0.0
        self.rows_by_node: Counter[str] = Counter()
        self.device_decoded = 0

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        columns = [column for column in batch if column not in self.BOOKKEEPING]
        if "scored_on" in batch:
            self.rows_by_node.update(str(node) for node in batch["scored_on"])
        if "device_decoded" in batch:
            self.device_decoded += int(np.sum(batch["device_decoded"]))
        for index, shard in enumerate(batch["shard"]):
            shard = str(shard)
            if shard not in self.expected:
                raise RuntimeError(f"row for unplanned shard {shard!r}")
            if shard in self.committed:
                continue  # a retried task delivering a row again after its shard was written: already there
            image_id = str(batch["image_id"][index])
            item_id = str(batch["item_id"][index]) if "item_id" in batch else image_id
            item_rows = int(batch["item_rows"][index]) if "item_rows" in batch else 1
            item = self.rows[shard][item_id]
            if image_id in item:
                continue
            item[image_id] = {column: batch[column][index] for column in columns}
            item[image_id].setdefault("run_id", self.run_id)  # carried rows keep the run that scored them
            if len(item) == item_rows:
                self.complete_items[shard] += 1
                if self.complete_items[shard] == self.expected[shard]:
                    self._commit(shard)

    def _commit(self, shard: str) -> None:
        started = time.perf_counter()
        by_id = {image_id: row for item in self.rows[shard].values() for image_id, row in item.items()}
        rows = [by_id[key] for key in sorted(by_id)]
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        depth = int(self.config["exit_depth"])
        columns["exit_scores"] = np.stack(columns["exit_scores"]) if rows else np.zeros((0, depth), np.float32)
        for name in ("embedding", "face_box"):
            if name in columns:
                columns[name] = np.stack(columns[name])
        columns.update(model_sha256=self.config["model_sha256"], shard=shard)
        table = build_quality_table(columns, metadata={
            "fusion": self.config["fusion"], "fusion_weights": self.config["fusion_weights"],
            "config_fingerprint": self.config_fingerprint,
        })
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.output.commit_bytes(f"scores/{shard}.parquet", buffer.getvalue())
        del self.rows[shard]
        self.complete_items.pop(shard, None)
        self.committed[shard] = None
        self.write_seconds += time.perf_counter() - started

    def missing(self) -> dict[str, int]:
        return {shard: n - self.complete_items[shard] for shard, n in self.expected.items()
                if shard not in self.committed}


def _item_blocks(plan: Plan, pending: list[int], block_rows: int, exclude: set[str] = frozenset()) -> list[pa.Table]:
    """Pending items (but `exclude`) as Arrow tables of `block_rows` rows: each becomes one Ray Data block."""
    items, shards = [], []
    for index in pending:
        shard_items = [item for item in plan.shard_items(index) if item.image_id not in exclude]
        items.extend(shard_items)
        shards.extend([shard_name(index)] * len(shard_items))
    table = items_to_table(items).append_column("shard", pa.array(shards, type=pa.string()))
    table = table.drop_columns(["size", "version"])
    return [table.slice(start, block_rows) for start in range(0, table.num_rows, block_rows)] or [table]


@dataclass(frozen=True)
class ActorPlacement:
    gpu: bool
    workers: int
    gpus_per_worker: float
    threads: int | None  # torch threads per CPU actor


def actor_placement(resources: Mapping[str, float], *, device: str = "auto", workers: int | None = None,
                    gpus_per_worker: float = 1.0) -> ActorPlacement:
    """How many scoring actors, on what: one per GPU by default, or several sharing a GPU with a
    fractional `gpus_per_worker` (a small model leaves a large GPU idle between batches); on CPUs one
    actor using the cluster's CPUs as torch threads."""
    if not 0 < gpus_per_worker <= 1 and not (gpus_per_worker > 1 and float(gpus_per_worker).is_integer()):
        raise ValueError(f"--gpus-per-worker must be in (0, 1] or a whole number, got {gpus_per_worker}")
    gpu_count = float(resources.get("GPU", 0))
    gpu = device in ("auto", "cuda") and gpu_count > 0
    if device == "cuda" and not gpu:
        if not workers:
            raise RuntimeError("--device cuda: the Ray cluster has no GPU now; on a cluster that adds GPU nodes on "
                               "demand (autoscaling from zero), say how many scoring actors to ask for: --workers N")
        # Ray queues the actors' GPU requests and the autoscaler adds nodes for them; --stall-timeout fails
        # the run if none ever comes.
        return ActorPlacement(True, workers, gpus_per_worker, None)
    if gpu:
        count = workers or max(1, int(gpu_count // gpus_per_worker))
        return ActorPlacement(True, count, gpus_per_worker, None)
    count = workers or 1
    return ActorPlacement(False, count, 0.0, max(1, int(resources.get("CPU", 1)) // count))


def spread_cpu_actors(placement: ActorPlacement, nodes_with_cpu: int) -> Any | None:
    """A placement group that puts CPU scoring actors on distinct nodes (STRICT_SPREAD: one per node while
    there are nodes enough; SPREAD beyond), or None when placement needs no help (one actor; GPU actors,
    which their GPU requests place). Without it Ray's default spreading is best effort: two actors may
    share one node, each running the threads meant for a node of its own (`ActorPlacement.threads`) while
    another node idles. Each bundle holds one actor's CPU; the caller removes the group after the run."""
    if placement.gpu or placement.workers < 2:
        return None
    from ray.util.placement_group import placement_group

    strategy = "STRICT_SPREAD" if placement.workers <= nodes_with_cpu else "SPREAD"
    return placement_group([{"CPU": 1}] * placement.workers, strategy=strategy, name=f"fiqa-{uuid.uuid4().hex[:8]}")


def placement_nodes(group: Any) -> list[str]:
    """The nodes that hold the placement group's bundles now (where its actors are; a bundle of a node that
    died and is not placed again has none)."""
    from ray.util.placement_group import placement_group_table

    return sorted({node for node in placement_group_table(group)["bundles_to_node_id"].values() if node})


class StallError(RuntimeError):
    """No scored batch arrived for longer than the stall timeout: the run is failed, not left hanging."""


def _watched(batches: Iterator[Any], stall_timeout: float | None) -> Iterator[Any]:
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
            raise StallError(f"no scored batch for {stall_timeout:g} s (--stall-timeout): the cluster may have "
                             "lost the resources it needs; committed shards are kept, rerun to resume") from None
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _carry_over(options: ScoreOptions, plan: Plan, pending: list[int], config: Mapping[str, Any],
                writer: ShardWriter) -> set[str]:
    """--since: hand the writer PREVIOUS's rows of unchanged images; returns the image ids carried."""
    from flows.incremental import carried_batches, unchanged_items

    previous = Output(options.since, options.storage_options)
    shard_of = {item.image_id: shard_name(i) for i in pending for item in plan.shard_items(i)}
    unchanged = unchanged_items(previous, plan, (item for i in pending for item in plan.shard_items(i)))
    carried: set[str] = set()
    for batch in carried_batches(previous, unchanged, shard_of, align=config["align"]):
        writer.add(batch)
        carried.update(str(item) for item in batch["item_id"])
    return carried


@task(name="execute", cache_policy=NONE)
def execute_task(
    options: ScoreOptions, plan: Plan, pending: list[int], config: dict[str, Any], checkpoint: str, run_id: str,
    on_rows: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    import ray
    from ray.data import DataContext

    json_console_logs()  # Ray Data installed its console handler when imported

    logger = get_run_logger()
    output = Output(options.output, options.storage_options)
    writer = ShardWriter(output, plan, pending, run_id=run_id, config=config)
    started = time.perf_counter()
    if not pending:
        return {"scored": 0, "carried": 0, "shards": [], "seconds": 0.0, "write_seconds": 0.0}
    carried = _carry_over(options, plan, pending, config, writer) if options.since else set()
    if carried:
        logger.info("carried over %d unchanged images from %s", len(carried), options.since)
    if not writer.missing():  # everything was carried over: nothing for Ray to do
        return {"scored": 0, "carried": len(carried), "shards": list(writer.committed),
                "seconds": time.perf_counter() - started, "write_seconds": writer.write_seconds}

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    placement = actor_placement(ray.cluster_resources(), device=options.device, workers=options.workers,
                                gpus_per_worker=options.gpus_per_worker)
    group = spread_cpu_actors(placement, sum(1 for node in ray.nodes() if node["Alive"]
                                             and node["Resources"].get("CPU", 0) >= 1))
    try:
        return _score_on_ray(options, plan, pending, config, checkpoint, placement, group, writer, carried,
                             started, on_rows)
    finally:
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)


def _score_on_ray(
    options: ScoreOptions, plan: Plan, pending: list[int], config: dict[str, Any], checkpoint: str,
    placement: ActorPlacement, group: Any | None, writer: ShardWriter, carried: set[str], started: float,
    on_rows: Callable[[int], None] | None,
) -> dict[str, Any]:
    import ray
    from ray.data import ActorPoolStrategy
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from workers.reading import read_and_decode
    from workers.stages import ScoreActor

    logger = get_run_logger()
    gpus, workers, threads = placement.gpu, placement.workers, placement.threads
    actor_options = {"scheduling_strategy": PlacementGroupSchedulingStrategy(group)} if group is not None else {}
    block_rows = options.batch_size or (GPU_BLOCK_ROWS if gpus else CPU_BATCH_SIZE)
    dataset = ray.data.from_arrow(_item_blocks(plan, pending, block_rows, exclude=carried))
    dataset = dataset.map_batches(
        # A fractional CPU: reading is mostly waiting on storage, and a resource request unlike the actor's
        # keeps Ray from fusing the two stages, so decoding overlaps with the model instead of preceding it.
        # With --align, reading also detects and warps faces: real CPU work, so it reserves a whole CPU.
        read_and_decode, batch_size=block_rows, batch_format="numpy", num_cpus=1 if config["align"] else 0.25,
        fn_kwargs={"storage_options": options.storage_options, "options_protocol": protocol_of(options.input),
                   "max_pixels": options.max_pixels, "align": config["align"],
                   "img_size": config["model_config"]["img_size"], "defer_jpeg": config["decode"] == "device"},
    )
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing `scheduling_strategy` to map_batches (to be removed in 2.64; the pinned
        # Ray is 2.60) and offers no named parameter for it yet; the two-node test fails when that changes.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        dataset = dataset.map_batches(
            ScoreActor, batch_size=block_rows, batch_format="numpy",
            compute=ActorPoolStrategy(size=workers),
            num_gpus=placement.gpus_per_worker, num_cpus=0 if gpus else 1, **actor_options,
            fn_constructor_kwargs={
                "checkpoint": checkpoint, "config": config["model_config"],
                "storage_options": options.storage_options, "device": "cuda" if gpus else "cpu",
                "exit_depth": config["exit_depth"], "fusion": config["fusion"],
                "batch_size": options.batch_size or ("auto" if gpus else CPU_BATCH_SIZE),
                "threads": threads, "expected_sha256": config["model_sha256"], "embeddings": config["embeddings"],
                "precision": config["precision"], "memory_share": min(1.0, placement.gpus_per_worker) if gpus else 1.0,
                "max_pixels": options.max_pixels,
            },
        )
    logger.info("scoring %d images on %d %s actor(s)", sum(writer.expected.values()), workers, "GPU" if gpus else "CPU")
    scored = 0
    first_batch_at: float | None = None
    for batch in _watched(dataset.iter_batches(batch_format="numpy", batch_size=None), options.stall_timeout):
        writer.add(batch)
        count = len(batch["image_id"])
        scored += count
        if first_batch_at is None:
            first_batch_at, first_count = time.perf_counter(), count
        if on_rows:
            on_rows(count)
    missing = writer.missing()
    if missing:
        raise RuntimeError(f"rows missing after scoring, shards not committed: {missing}")
    finished = time.perf_counter()
    steady = (scored - first_count) / (finished - first_batch_at) if first_batch_at and finished > first_batch_at else 0.0
    return {"scored": scored, "carried": len(carried), "shards": list(writer.committed), "seconds": finished - started,
            # start-up (actors spawned, model loaded, first batch through) vs the rate once running
            "first_batch_seconds": (first_batch_at or finished) - started, "steady_images_per_second": steady,
            "write_seconds": writer.write_seconds, "workers": workers, "device": "cuda" if gpus else "cpu",
            "rows_by_node": dict(writer.rows_by_node), "block_rows": block_rows,
            "actor_nodes": placement_nodes(group) if group is not None else sorted(writer.rows_by_node),
            "device_decoded": writer.device_decoded}


@task(name="finalize", cache_policy=NONE)
def finalize_task(
    options: ScoreOptions, plan: Plan, config: dict[str, Any], run_id: str, stats: dict[str, Any],
    timings: dict[str, float], skipped: int, uses_demo: bool,
) -> RunSummary:
    output = Output(options.output, options.storage_options)
    # Totals over every committed shard, this run's and earlier ones'. Each item has exactly one row whose
    # face_index is null or 0 (its only row, or its largest face), so those count the items.
    statuses: Counter[str] = Counter()
    items = 0
    if output.list("scores"):
        table = pq.read_table(output.path("scores"), columns=["status", "face_index"], filesystem=output.fs)
        statuses.update(table.column("status").to_pylist())
        face_index = table.column("face_index").to_numpy(zero_copy_only=False)
        items = int(np.sum(np.isnan(face_index.astype(np.float64)) | (face_index == 0)))
    total = sum(statuses.values())
    if items != plan.item_count:
        raise RuntimeError(f"OUTPUT holds rows for {items} items, {plan.item_count} were planned")
    execute_seconds = timings.get("execute", 0.0)
    summary = RunSummary(
        output=output.full_url(), run_id=run_id, counts=dict(sorted(statuses.items())), total_rows=total,
        scored_now=stats["scored"], shards_written=len(stats["shards"]), shards_skipped=skipped,
        seconds={k: round(v, 3) for k, v in timings.items()},
        images_per_second=round(stats["scored"] / execute_seconds, 2) if execute_seconds > 0 else 0.0,
        model_sha256=config["model_sha256"], exit_depth=config["exit_depth"], fusion=config["fusion"],
        uses_demo_model=uses_demo, carried_over=stats.get("carried", 0),
    )
    import prefect
    import ray
    import torch

    record = {
        **asdict(summary), "finished_at": datetime.now(UTC).isoformat(), "input": options.input,
        "input_kind": plan.input_kind, "shard_size": plan.shard_size, "shard_count": plan.shard_count,
        "config": config, "workers": stats.get("workers"), "device": stats.get("device"),
        "checkpoint": options.checkpoint or str(BUNDLED_CHECKPOINT), "since": options.since,
        "stages": {"write_seconds": round(stats.get("write_seconds", 0.0), 3),
                   "first_batch_seconds": round(stats.get("first_batch_seconds", 0.0), 3),
                   "steady_images_per_second": round(stats.get("steady_images_per_second", 0.0), 2),
                   "rows_by_node": stats.get("rows_by_node", {}), "actor_nodes": stats.get("actor_nodes", []),
                   "block_rows": stats.get("block_rows"),
                   "decoded_on_device": stats.get("device_decoded", 0)},
        "versions": {"fiqa_curator": _version(), "python": platform.python_version(), "torch": torch.__version__,
                     "ray": ray.__version__, "prefect": prefect.__version__, "pyarrow": pa.__version__},
    }
    output.commit_bytes(RUN_FILE, json.dumps(record, indent=1, default=str).encode())
    output.commit_bytes(SUCCESS_FILE, b"")
    return summary


@task(name="report", cache_policy=NONE)
def report_task(options: ScoreOptions, summary: RunSummary) -> str:
    """Write OUTPUT/report/index.html and publish the summary as Prefect artifacts under stable keys, so
    nightly runs of the same deployment build a history."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from flows.report import write_report

    url, report = write_report(options.output, options.storage_options)
    thresholds = report.get("thresholds", {})
    lines = [f"# fiqa-curator: {summary.total_rows} images", "",
             f"- output: `{summary.output}`", f"- report: [{url}]({url})",
             f"- model sha256: `{summary.model_sha256}`, exit depth {summary.exit_depth}, fusion `{summary.fusion}`",
             "", "| status | images |", "|---|---|",
             *[f"| {status} | {count} |" for status, count in summary.counts.items()],
             "", "| quantile | threshold | images dropped |", "|---|---|---|",
             *[f"| {q} | {v['threshold']:.4f} | {v['dropped']} |" for q, v in thresholds.items()]]
    create_markdown_artifact(key="fiqa-report", markdown="\n".join(lines), description="fiqa score summary")
    create_table_artifact(key="fiqa-status-counts", table=[{"status": s, "images": n} for s, n in summary.counts.items()],
                          description="images by status")
    return url


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fiqa-curator")
    except PackageNotFoundError:
        return "unknown"


@flow(name="fiqa-score", log_prints=False, validate_parameters=False)
def score_flow_run(
    options: ScoreOptions, storage_options_ref: str | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> RunSummary:
    """The flow itself. Prefect records flow parameters (in its database, on a real server), and
    credentials must never end up there: storage options stay in this process and the flow receives
    only an opaque reference to them."""
    if storage_options_ref is not None:
        options = replace(options, storage_options=_PRIVATE_STORAGE_OPTIONS[storage_options_ref])
    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded, checkpoint = resolve_model(options)
    device, started_ray = scoring_device(options.device, options.ray_address)
    try:
        options = replace(options, device=device)
        config = scoring_config(loaded, options)
        del loaded  # actors load their own copy; the driver only needed the checks and the hash
        timings["load_model"] = time.perf_counter() - started

        started = time.perf_counter()
        plan, pending = plan_task(options, config)
        timings["plan"] = time.perf_counter() - started

        if options.since:  # a PREVIOUS of another configuration fails now, before any work
            from flows.incremental import check_previous

            check_previous(Output(options.since, options.storage_options), plan)
        run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        if pending and not started_ray:
            started_ray = init_ray(options.ray_address)
        started = time.perf_counter()
        stats = execute_task(options, plan, pending, config, checkpoint, run_id, on_rows)
        timings["execute"] = time.perf_counter() - started
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    summary = finalize_task(options, plan, config, run_id, stats, timings,
                            plan.shard_count - len(pending), options.checkpoint is None)
    if options.report:
        try:
            summary.report = report_task(options, summary)
        except Exception as error:  # the scores are committed and _SUCCESS written: a report bug must not fail them
            get_run_logger().warning("report not written: %s: %s (rerun with `fiqa report`)", type(error).__name__, error)
    return summary


def score_flow(options: ScoreOptions, on_rows: Callable[[int], None] | None = None) -> RunSummary:
    """Score every image of INPUT into OUTPUT's quality table; resumes a previous run of the same plan."""
    from flows.prefect_server import ensure_prefect_api

    ensure_prefect_api()  # Prefect's temporary server, started and waited for with a timeout of our own
    reference = uuid.uuid4().hex if options.storage_options else None
    if reference:
        _PRIVATE_STORAGE_OPTIONS[reference] = dict(options.storage_options)
    try:
        return score_flow_run(replace(options, storage_options={}), reference, on_rows)
    finally:
        _PRIVATE_STORAGE_OPTIONS.pop(reference, None)
