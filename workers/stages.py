"""The scoring stage that runs on a Ray actor pool, as a plain callable class over column batches.

`ScoreActor` loads the model once, scores the decodable rows of each batch at the configured exit depth
and passes the others through untouched. Rows the reading stage left encoded (`--decode device`) are
decoded here, on the scoring device, first. Its partner stage, `reading.read_and_decode`, lives apart so
that reading tasks never import torch. Both take and return `dict[str, np.ndarray]` batches (Ray Data's
numpy format) and are tested by calling them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fiqa_curator.schemas.batch import (
    DEVICE_DECODED,
    EMBEDDING,
    ENCODED,
    JPEG,
    PIXELS,
    SCORED_COLUMNS,
    SCORED_ON,
    STAGE_INPUTS,
)
from fiqa_curator.schemas.status import Status
from fiqa_curator.workers import device_decode
from fiqa_curator.workers.allocator import keeps_large_buffers
from fiqa_curator.workers.checkpoint import load_model
from fiqa_curator.workers.config import ViTFIQAConfig
from fiqa_curator.workers.preprocess import decode_face
from fiqa_curator.workers.scoring import QualityScorer
from fiqa_curator.workers.settings import DEFAULT_MAX_PIXELS


def _ray_node_id() -> str:
    """The Ray node this actor runs on ("local" outside Ray), for the run record's per-node counts."""
    try:
        import ray
    except ImportError:  # the stage called directly, without Ray installed
        return "local"
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


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
        batch_size: int | str = 64,
        threads: int | None = None,
        expected_sha256: str | None = None,
        embeddings: bool = False,
        precision: str = "auto",
        memory_share: float = 1.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if threads:
            torch.set_num_threads(int(threads))  # Ray sets OMP_NUM_THREADS to the actor's CPU reservation
        # `config` is the architecture the driver resolved and checked; the weights are checked against it
        # again.
        loaded = load_model(checkpoint, ViTFIQAConfig.from_dict(config), storage_options=storage_options)
        self.scorer = QualityScorer(
            loaded, device=device, batch_size=batch_size, precision=precision, memory_share=memory_share
        )
        # started by the pipeline with its large buffers kept in the heap (workers.allocator), on CPU
        self.keeps_large_buffers = keeps_large_buffers()
        self.max_pixels = max_pixels
        self.exit_depth = exit_depth or loaded.config.depth
        self.fusion = fusion
        self.embeddings = embeddings
        self.sha256 = loaded.sha256
        self.node_id = _ray_node_id()
        if expected_sha256 and loaded.sha256 != expected_sha256:
            raise RuntimeError(
                f"checkpoint {checkpoint} changed during the run: sha256 {loaded.sha256}, "
                f"planned with {expected_sha256}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["status"])
        out = {key: value for key, value in batch.items() if key not in STAGE_INPUTS}
        out[SCORED_ON.name] = np.full(count, self.node_id, dtype=SCORED_ON.dtype)  # for the run record
        out[DEVICE_DECODED.name] = DEVICE_DECODED.empty(count)  # for the run record
        out["status"] = np.array(
            batch["status"], dtype=object
        )  # copies: device decoding may turn rows into errors
        out["error"] = np.array(batch["error"], dtype=object)
        for name, column in SCORED_COLUMNS.items():  # null until scored
            out[name] = column.empty(count, self.exit_depth)
        if self.embeddings:
            out[EMBEDDING.name] = EMBEDDING.empty(count, self.scorer.loaded.config.embed_dim)
        images, ok = self._images(batch, out)
        if ok.any():
            result = self.scorer.score(
                images, exit_depth=self.exit_depth, fusion=self.fusion, embeddings=self.embeddings
            )
            if result.embedding is not None:
                out["embedding"][ok] = result.embedding
            out["exit_scores"][ok] = result.exit_scores
            out["quality_final"][ok] = result.fused["final"]
            out["quality_f"][ok] = result.fused["f"]
            out["quality_fw"][ok] = result.fused["fw"]
            out["quality"][ok] = result.quality
        return out

    def _images(self, batch: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> tuple[Any, np.ndarray]:
        """The pixels of the batch's decodable rows (numpy, or a tensor on the device when some were decoded
        there) and the mask of those rows. Batches of `--decode device` carry every row as bytes (see
        `reading`): JPEGs are decoded on the device, in one call; one the device decoder refuses is decoded
        on the CPU, and one that fails there too gets the CPU path's status and reason."""
        ok = out["status"] == Status.OK
        if ENCODED.name not in batch:
            return np.asarray(batch[PIXELS])[ok], ok
        encoded, jpeg = batch[ENCODED.name], np.asarray(batch[JPEG.name], dtype=bool)
        device, size = self.scorer.device, self.scorer.loaded.config.img_size
        host: dict[int, np.ndarray] = {  # row -> pixels decoded on a CPU (by the reading stage, or below)
            i: np.frombuffer(encoded[i], dtype=np.uint8).reshape(size, size, 3)
            for i in np.flatnonzero(ok & ~jpeg)
        }
        deferred = np.flatnonzero(ok & jpeg)
        decoded = device_decode.decode_jpegs([encoded[i] for i in deferred], device)
        on_device = out[DEVICE_DECODED.name]
        for index, image in zip(deferred, decoded, strict=True):
            if image is not None and tuple(image.shape) == (size, size, 3):
                on_device[index] = True
                continue
            fallback = decode_face(bytes(encoded[index]), size=size, max_pixels=self.max_pixels)
            if fallback.ok:
                host[index] = fallback.image
            else:
                out["status"][index], out["error"][index] = str(fallback.status), fallback.error or ""
        ok = out["status"] == Status.OK
        rows = sorted(host)  # = the ok rows not decoded on the device
        pixels = np.stack([host[i] for i in rows]) if rows else np.zeros((0, size, size, 3), np.uint8)
        if not on_device.any():
            return pixels, ok
        images = torch.empty((int(ok.sum()), size, size, 3), dtype=torch.uint8, device=device)
        position = np.cumsum(ok) - 1  # row -> its place among the ok rows
        if rows:
            images[torch.as_tensor(position[rows], device=device)] = torch.as_tensor(pixels).to(device)
        images[torch.as_tensor(position[on_device], device=device)] = torch.stack(
            [image for index, image in zip(deferred, decoded, strict=True) if on_device[index]]
        )
        return images, ok
