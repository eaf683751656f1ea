"""The scoring stage that runs on a Ray actor pool, as a plain callable class over column batches.

`ScoreActor` loads the model once, scores the decodable rows of each batch at the configured exit depth
and passes the others through untouched. Its partner stage, `reading.read_and_decode`, lives apart so
that reading tasks never import torch. Both take and return `dict[str, np.ndarray]` batches (Ray Data's
numpy format) and are tested by calling them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from workers.checkpoint import load_model
from workers.config import ViTFIQAConfig
from workers.scoring import QualityScorer

SCORE_COLUMNS = ("quality_final", "quality_f", "quality_fw", "quality")


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
        embeddings: bool = False,
    ) -> None:
        if threads:
            torch.set_num_threads(int(threads))  # Ray sets OMP_NUM_THREADS to the actor's CPU reservation
        # `config` is the architecture the driver resolved and checked; the weights are checked against it again.
        loaded = load_model(checkpoint, ViTFIQAConfig.from_dict(config), storage_options=storage_options)
        self.scorer = QualityScorer(loaded, device=device, batch_size=batch_size)
        self.exit_depth = exit_depth or loaded.config.depth
        self.fusion = fusion
        self.embeddings = embeddings
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
        if self.embeddings:
            out["embedding"] = np.full((count, self.scorer.loaded.config.embed_dim), np.nan, dtype=np.float32)
        if ok.any():
            result = self.scorer.score(np.asarray(batch["pixels"])[ok], exit_depth=self.exit_depth, fusion=self.fusion,
                                       embeddings=self.embeddings)
            if result.embedding is not None:
                out["embedding"][ok] = result.embedding
            out["exit_scores"][ok] = result.exit_scores
            out["quality_final"][ok] = result.fused["final"]
            out["quality_f"][ok] = result.fused["f"]
            out["quality_fw"][ok] = result.fused["fw"]
            out["quality"][ok] = result.quality
        return out
