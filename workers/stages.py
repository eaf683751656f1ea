"""The two pipeline stages that run on Ray workers, as plain callables over column batches.

- `read_and_decode`: stateless, runs as Ray tasks on CPUs: reads each item's bytes (whole file or byte
  range) with retries, decodes to 112x112 RGB; every failure becomes a status and a reason.
- `ScoreActor`: stateful, runs on an actor pool: loads the model once, scores the decodable rows of each
  batch at the configured exit depth, passes the others through untouched.

They take and return `dict[str, np.ndarray]` batches (Ray Data's numpy format) and know nothing of Ray
itself, so they are tested by calling them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from workers.checkpoint import load_model
from workers.config import ViTFIQAConfig
from workers.io import read_range
from workers.preprocess import DEFAULT_MAX_PIXELS, DecodedImage, DecodeStatus, decode_face
from workers.scoring import QualityScorer

READ_THREADS = 16  # object stores reward many requests in flight; local disks do not mind
SCORE_COLUMNS = ("quality_final", "quality_f", "quality_fw", "quality")


def _load_one(
    url: str, offset: int, length: int, storage_options: Mapping[str, Any] | None, size: int, max_pixels: int
) -> tuple[DecodedImage, int, str]:
    try:
        data = read_range(url, int(offset), int(length), storage_options)
    except Exception as error:
        return DecodedImage(DecodeStatus.DECODE_ERROR), -1, f"{type(error).__name__}: {error}"
    return decode_face(data, size=size, max_pixels=max_pixels), len(data), ""


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    storage_options: Mapping[str, Any] | None = None,
    img_size: int = 112,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """Items (image_id, url, offset, length, ...) -> the same columns plus pixels and decode results."""
    count = len(batch["image_id"])
    pixels = np.zeros((count, img_size, img_size, 3), dtype=np.uint8)
    status = np.empty(count, dtype=object)
    error = np.empty(count, dtype=object)
    width = np.full(count, -1, dtype=np.int64)
    height = np.full(count, -1, dtype=np.int64)
    byte_size = np.full(count, -1, dtype=np.int64)
    resized = np.zeros(count, dtype=bool)
    jobs = zip(batch["url"], batch["offset"], batch["length"], strict=True)
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, count))) as pool:
        results = list(pool.map(lambda job: _load_one(*job, storage_options, img_size, max_pixels), jobs))
    for index, (decoded, n_bytes, read_error) in enumerate(results):
        byte_size[index] = n_bytes
        if read_error:
            status[index], error[index] = "read_error", read_error
            continue
        status[index], error[index] = str(decoded.status), decoded.error or ""
        width[index] = decoded.width if decoded.width is not None else -1
        height[index] = decoded.height if decoded.height is not None else -1
        if decoded.ok:
            pixels[index] = decoded.image
            resized[index] = decoded.resized
    passthrough = {key: value for key, value in batch.items() if key not in ("url", "offset", "length")}
    return {**passthrough, "pixels": pixels, "status": status, "error": error, "width": width,
            "height": height, "byte_size": byte_size, "resized": resized}


def _ray_node_id() -> str:
    """The Ray node this actor runs on ("local" outside Ray), for the run record's per-node counts."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:
        return "local"


class ScoreActor:
    """One model per actor, loaded once; scores every `ok` row of a batch in one early-exit pass.

    `expected_sha256` guards against the checkpoint changing between planning and scoring."""

    def __init__(
        self,
        checkpoint: str,
        config: Mapping[str, Any],
        *,
        storage_options: Mapping[str, Any] | None = None,
        device: str = "auto",
        exit_depth: int | None = None,
        fusion: str = "fw",
        batch_size: int = 64,
        threads: int | None = None,
        expected_sha256: str | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(int(threads))  # Ray sets OMP_NUM_THREADS to the actor's CPU reservation
        # `config` is the architecture the driver resolved and checked; the weights are checked against it again.
        loaded = load_model(checkpoint, ViTFIQAConfig.from_dict(config), storage_options=storage_options)
        self.scorer = QualityScorer(loaded, device=device, batch_size=batch_size)
        self.exit_depth = exit_depth or loaded.config.depth
        self.fusion = fusion
        self.sha256 = loaded.sha256
        self.node_id = _ray_node_id()
        if expected_sha256 and loaded.sha256 != expected_sha256:
            raise RuntimeError(f"checkpoint {checkpoint} changed during the run: sha256 {loaded.sha256}, "
                               f"planned with {expected_sha256}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["status"]) == "ok"
        count = len(ok)
        out = {key: value for key, value in batch.items() if key != "pixels"}
        out["scored_on"] = np.full(count, self.node_id, dtype=object)  # observability; not a table column
        out["exit_scores"] = np.full((count, self.exit_depth), np.nan, dtype=np.float32)
        for name in SCORE_COLUMNS:
            out[name] = np.full(count, np.nan, dtype=np.float32)
        if ok.any():
            result = self.scorer.score(np.asarray(batch["pixels"])[ok], exit_depth=self.exit_depth, fusion=self.fusion)
            out["exit_scores"][ok] = result.exit_scores
            out["quality_final"][ok] = result.fused["final"]
            out["quality_f"][ok] = result.fused["f"]
            out["quality_fw"][ok] = result.fused["fw"]
            out["quality"][ok] = result.quality
        return out
