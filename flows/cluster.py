"""Ray, as the scoring job uses it: joining a cluster or starting a private one on loopback, where the
scoring actors go (how many, on which devices and nodes), and Ray's logs in the format `fiqa` was asked for.

Nothing here knows about images or the quality table; `flows.execution` builds the pipeline on top.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fiqa_curator.flows import timeline
from fiqa_curator.schemas.errors import UserError

LOG_FORMAT_ENV = "FIQA_LOG_FORMAT"  # "json": set by `fiqa --log-json`


def scoring_device(device: str, address: str | None, local_gpu: bool | None = None) -> str:
    """ "cpu" or "cuda": where the actors will score. Decided before planning
    because "auto" precision, which is part of the configuration, depends on it. A cluster named by
    address is asked for its GPUs (joining it now); a local run looks at this machine. An autoscaling
    cluster with no GPU node up yet reads as CPU: pass --device cuda there. `local_gpu`: whether torch sees
    a GPU here, when the caller knows (the model check tells it); else torch is asked."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device != "auto":
        return device
    if address or os.environ.get("RAY_ADDRESS"):
        start_ray(address)
        import ray

        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    if local_gpu is None:
        import torch

        local_gpu = torch.cuda.is_available()
    return "cuda" if local_gpu else "cpu"


def init_ray(address: str | None) -> bool:
    """Join the cluster at `address` / RAY_ADDRESS, or start a local Ray bound to loopback.
    Returns True when this call started or joined Ray (the caller then shuts it down: `start_ray`)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost"):
        # Every Ray socket on 127.0.0.1 (ENVIRONMENT notes), and for a cluster on loopback the driver looks
        # for its raylet there. Ray reads this when it is imported: set it first.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    _wait_for_shutdown()  # a Ray still stopping in the background (`stop_ray`) cannot be started or joined
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
    timeline.mark("ray joined" if address else "ray started")
    return True


_started_for_runs = False  # Ray was started (or joined) by `start_ray`: `stop_ray` shuts it down
_stopping: threading.Thread | None = None  # a shutdown `stop_ray(in_background=True)` left running
logger = logging.getLogger(__name__)


def start_ray(address: str | None) -> None:
    """Ray for a scoring run, when it first needs it (listing big WebDataset shards, scoring; or early,
    while Prefect's server starts). Ray is one per process, and so is its owner: a Ray this process did not
    start here (a test's cluster, a notebook's) is used and left running."""
    global _started_for_runs
    if init_ray(address):
        _started_for_runs = True


def stop_ray(*, in_background: bool = False) -> None:
    """Shut down the Ray that `start_ray` started; nothing otherwise. Safe to call more than once.

    in_background: the shutdown runs on a thread of its own while the caller goes on with work that needs no
    Ray (a run's finalizing and report): it takes about 1.3 s, nearly all of it waiting for Ray's processes
    to exit (docs/benchmarks.md). A later `stop_ray()` or `start_ray` waits for it to end."""
    global _started_for_runs, _stopping
    if _started_for_runs:
        import ray

        _started_for_runs = False
        if in_background:
            _stopping = threading.Thread(target=_shutdown, name="fiqa-ray-shutdown")
            _stopping.start()
            return
        ray.shutdown()
    _wait_for_shutdown()


def _shutdown() -> None:
    import ray

    try:
        ray.shutdown()
    except Exception as error:  # the scores are committed by now: a failed shutdown is worth a line, no more
        logger.warning("Ray did not shut down cleanly: %s: %s", type(error).__name__, error)


def _wait_for_shutdown() -> None:
    global _stopping
    if _stopping is not None:
        _stopping.join()
        _stopping = None


def json_console_logs() -> None:
    """With `fiqa --log-json`, Ray's and Ray Data's console lines on this driver in Prefect's JSON format
    (Ray Data installs its own text handler when it is first imported, and only then: this function imports
    it, so that no later import puts a plain-text handler back). Ray's C++ core still writes its rare error
    lines in its own (glog) format: it does not go through Python logging."""
    if os.environ.get(LOG_FORMAT_ENV) != "json":
        return
    import logging

    import ray.data  # noqa: F401  (installs its console handler when first imported: do it here, then reformat it)
    from prefect.logging.formatters import JsonFormatter

    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setFormatter(JsonFormatter("default", None, None))


@dataclass(frozen=True)
class ActorPlacement:
    """How many scoring actors, and what each takes."""

    gpu: bool
    workers: int
    gpus_per_worker: float
    threads: int | None  # torch threads per CPU actor


def actor_placement(
    resources: Mapping[str, float],
    *,
    device: str = "auto",
    workers: int | None = None,
    gpus_per_worker: float = 1.0,
) -> ActorPlacement:
    """How many scoring actors, on what: one per GPU by default, or several sharing a GPU with a
    fractional `gpus_per_worker` (a small model leaves a large GPU idle between batches); on CPUs one
    actor using the cluster's CPUs as torch threads."""
    if not 0 < gpus_per_worker <= 1 and not (gpus_per_worker > 1 and float(gpus_per_worker).is_integer()):
        raise UserError(f"--gpus-per-worker must be in (0, 1] or a whole number, got {gpus_per_worker}")
    gpu_count = float(resources.get("GPU", 0))
    gpu = device in ("auto", "cuda") and gpu_count > 0
    if device == "cuda" and not gpu:
        if not workers:
            raise UserError(
                "--device cuda: the Ray cluster has no GPU now; on a cluster that adds GPU nodes on "
                "demand (autoscaling from zero), say how many scoring actors to ask for: --workers N"
            )
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
    return placement_group(
        [{"CPU": 1}] * placement.workers, strategy=strategy, name=f"fiqa-{uuid.uuid4().hex[:8]}"
    )


def placement_nodes(group: Any) -> list[str]:
    """The nodes that hold the placement group's bundles now (where its actors are; a bundle of a node that
    died and is not placed again has none)."""
    from ray.util.placement_group import placement_group_table

    return sorted({node for node in placement_group_table(group)["bundles_to_node_id"].values() if node})


def cpu_node_count() -> int:
    """Alive nodes of the connected cluster with at least one CPU."""
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1)
