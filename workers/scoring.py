"""Batch scoring API: uint8 RGB faces in, per-exit scores, fused scores and embeddings out.

`QualityScorer` wraps a loaded model with a device and precision policy and chunks large inputs; it is
what Ray actors and notebooks call. The arithmetic lives in `model` and `fusion`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.checkpoint import LoadedModel
from workers.fusion import Fusion, parse_fusion
from workers.preprocess import normalize

DEFAULT_FUSIONS = ("f", "fw", "final")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available on this machine")
    return resolved


@dataclass
class ScoreResult:
    """Scores of N images at exit depth L.

    exit_scores: (N, L) float32, column l-1 is the EX-FIQA score of exit l.
    fused:       scheme name -> (N,) float32; `weights` holds the weights that produced each.
    primary:     the scheme whose scores `quality` returns.
    embedding:   (N, D) float32 at full depth when asked for, else None.
    """

    exit_depth: int
    exit_scores: np.ndarray
    fused: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    primary: str
    embedding: np.ndarray | None = None
    fusion_specs: dict[str, str] = field(default_factory=dict)

    @property
    def quality(self) -> np.ndarray:
        return self.fused[self.primary]

    def __len__(self) -> int:
        return int(self.exit_scores.shape[0])


class QualityScorer:
    """Scores batches of aligned 112x112 RGB faces with one loaded ViT-FIQA model.

    precision: "fp32", "bf16" (autocast; CUDA) or "auto" (bf16 on CUDA, fp32 on CPU). The final norm and
    the heads always run in float32, as in the official code.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int = 64,
    ) -> None:
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.loaded = loaded
        self.device = resolve_device(device)
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        self.batch_size = int(batch_size)
        self.model = loaded.model.to(self.device).eval()

    @property
    def depth(self) -> int:
        return self.loaded.config.depth

    def _check_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        size = self.loaded.config.img_size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
            raise ValueError(
                f"expected (N, {size}, {size}, 3) uint8 RGB images, got {tuple(images.shape)} {images.dtype}"
            )
        return images

    @torch.inference_mode()
    def score(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        exit_depth: int | None = None,
        fusion: str | Fusion | Sequence[float] = "fw",
        extra_fusions: Iterable[str | Fusion] = DEFAULT_FUSIONS,
        embeddings: bool = False,
    ) -> ScoreResult:
        """Score (N, 112, 112, 3) uint8 RGB images in one pass per chunk, stopping at `exit_depth`."""
        depth = self.depth if exit_depth is None else int(exit_depth)
        primary = parse_fusion(fusion)
        fusions = {primary.name: primary}
        for extra in extra_fusions:
            parsed = parse_fusion(extra)
            fusions.setdefault(parsed.name, parsed)
        weights = {name: f.weights(depth) for name, f in fusions.items()}  # validates user weights early

        if embeddings and depth != self.depth:
            raise ValueError(f"embeddings exist only at full depth ({self.depth}), not at exit depth {depth}")
        images = self._check_images(images)
        exit_chunks = [np.zeros((0, depth), dtype=np.float32)]
        embedding_chunks = [np.zeros((0, self.loaded.config.embed_dim), dtype=np.float32)]
        on_gpu = self.device.type == "cuda"
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size]
            if on_gpu:  # uint8 over the bus (4x less than float32), from pinned memory, normalised on the GPU
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            pixels = normalize(chunk).to(self.device)
            with torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
            ):
                out = self.model.forward_exits(pixels, depth, with_embedding=embeddings)
            exit_chunks.append(out.exit_scores.float().cpu().numpy())
            if out.embedding is not None:
                embedding_chunks.append(out.embedding.float().cpu().numpy())
        exit_scores = np.concatenate(exit_chunks)
        embedding = np.concatenate(embedding_chunks) if embeddings else None
        return ScoreResult(
            exit_depth=depth,
            exit_scores=exit_scores,
            fused={name: f.fuse(exit_scores) for name, f in fusions.items()},
            weights=weights,
            primary=primary.name,
            embedding=embedding,
            fusion_specs={name: str(f) for name, f in fusions.items()},
        )
