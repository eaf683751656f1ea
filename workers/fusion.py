"""EX-FIQA fusion of early-exit scores: `s = sum_l w_l * s_l` over exits 1..L.

Schemes (named so every fused number says where it came from):
- `f`     EX-FIQA-F, uniform weights 1/L;
- `fw`    EX-FIQA-FW, weights proportional to depth, l / sum(1..L);
- `final` the last exit alone (the plain ViT-FIQA score when L is the model depth);
- `w`     user weights, one per exit, non-negative, normalised to sum to 1 so fused scores stay on the
          scale of the exits (the paper describes no per-exit normalisation, and none is applied).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fiqa_curator.schemas.errors import UserError

BUILTIN = ("f", "fw", "final")


@dataclass(frozen=True)
class Fusion:
    """A fusion scheme. `user_weights` is set only for scheme `w`."""

    scheme: str
    user_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.scheme not in (*BUILTIN, "w"):
            raise UserError(f"unknown fusion {self.scheme!r}: use f, fw, final or w1,...,wL")
        if (self.scheme == "w") != (self.user_weights is not None):
            raise UserError("user weights go with scheme 'w' and only with it")
        if self.user_weights is not None:
            weights = self.user_weights
            if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise UserError(f"fusion weights must be finite, non-negative and not all zero: {weights}")

    @property
    def name(self) -> str:
        """Column-friendly name: quality_<name> holds the fused score."""
        return self.scheme

    def weights(self, exit_depth: int) -> np.ndarray:
        """Weights over exits 1..exit_depth (float64, sum 1)."""
        if exit_depth < 1:
            raise ValueError(f"exit depth must be >= 1, got {exit_depth}")
        if self.scheme == "f":
            weights = np.ones(exit_depth)
        elif self.scheme == "fw":
            weights = np.arange(1, exit_depth + 1, dtype=np.float64)
        elif self.scheme == "final":
            weights = np.zeros(exit_depth)
            weights[-1] = 1.0
        else:
            assert self.user_weights is not None
            if len(self.user_weights) != exit_depth:
                raise UserError(
                    f"{len(self.user_weights)} fusion weights given for {exit_depth} exits: "
                    "give one per exit 1..L"
                )
            weights = np.asarray(self.user_weights, dtype=np.float64)
        return weights / weights.sum()

    def fuse(self, exit_scores: np.ndarray) -> np.ndarray:
        """(N, L) exit scores -> (N,) fused scores, float32 like the scores."""
        exit_scores = np.asarray(exit_scores)
        weights = self.weights(exit_scores.shape[1])
        return (exit_scores.astype(np.float64) @ weights).astype(np.float32)

    def __str__(self) -> str:
        if self.user_weights is None:
            return self.scheme
        return ",".join(f"{w:g}" for w in self.user_weights)


def parse_fusion(spec: str | Fusion | Sequence[float]) -> Fusion:
    """`"fw"`, `"f"`, `"final"`, `"0.1,0.2,0.7"` (or `"w:0.1,..."`), a Fusion, or a sequence of weights."""
    if isinstance(spec, Fusion):
        return spec
    if not isinstance(spec, str):
        return Fusion("w", tuple(float(w) for w in spec))
    text = spec.strip().lower()
    if text in BUILTIN:
        return Fusion(text)
    text = text.removeprefix("w:")
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise UserError(
            f"unknown fusion {spec!r}: use f, fw, final or comma-separated weights w1,...,wL"
        ) from error
    return Fusion("w", weights)
