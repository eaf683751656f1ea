"""Batch scoring API: uint8 RGB faces in, per-exit scores, fused scores and embeddings out.

`QualityScorer` wraps a loaded model with a device and precision policy and chunks large inputs; it is
what Ray actors and notebooks call. The arithmetic lives in `model` and `fusion`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fiqa_curator.schemas.errors import UserError
from fiqa_curator.workers.checkpoint import LoadedModel
from fiqa_curator.workers.fusion import Fusion, parse_fusion
from fiqa_curator.workers.model import ExitOutput
from fiqa_curator.workers.preprocess import normalize
from fiqa_curator.workers.settings import CPU_BATCH_SIZE

DEFAULT_FUSIONS = ("f", "fw", "final")
AUTO_BATCH_CAP = 2048  # a GPU is saturated well before this for ViT-S/B at 112x112
PROBE_IMAGES = 32


def batch_size_for_memory(
    per_image_bytes: float,
    free_bytes: float,
    *,
    share: float = 1.0,
    headroom: float = 0.7,
    cap: int = AUTO_BATCH_CAP,
    multiple: int = 32,
) -> int:
    """The largest batch whose activations fit in `headroom` of `share` of the free device memory.

    per_image_bytes: the peak memory one image adds during a forward pass (measured, `QualityScorer`);
    share: the fraction of the GPU this scorer owns (`--gpus-per-worker` 0.5: two scorers share it).
    Rounded down to a multiple of `multiple` (kernel-friendly shapes), at most `cap`, at least 1."""
    if per_image_bytes <= 0 or free_bytes <= 0 or not 0 < share <= 1:
        raise ValueError(
            f"need positive memory figures and 0 < share <= 1, got {per_image_bytes}, {free_bytes}, {share}"
        )
    fits = int(free_bytes * share * headroom // per_image_bytes)
    if fits >= multiple:
        fits = fits // multiple * multiple
    return max(1, min(cap, fits))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but CUDA is not available on this machine")
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

    precision: "fp32", "bf16" (autocast) or "auto" (bf16 on CUDA, fp32 on CPU). The final norm and the
    heads always run in float32, as in the official code.
    batch_size: images per forward pass, or "auto": on CUDA the largest batch that fits the free memory
    (measured once with a probe batch, times `memory_share`, the fraction of the GPU this scorer owns),
    on CPU `CPU_BATCH_SIZE`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int | str = 64,
        memory_share: float = 1.0,
    ) -> None:
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.loaded = loaded
        self.device = resolve_device(device)
        self.precision = (
            ("bf16" if self.device.type == "cuda" else "fp32") if precision == "auto" else precision
        )
        self.model = loaded.model.to(self.device).eval()
        if batch_size == "auto":
            batch_size = (
                batch_size_for_memory(*self._memory_probe(), share=memory_share)
                if self.device.type == "cuda"
                else CPU_BATCH_SIZE
            )
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 or 'auto', got {batch_size!r}")

    @torch.inference_mode()
    def _memory_probe(self) -> tuple[float, float]:
        """(peak bytes one image adds to a full-depth pass with the embedding, free bytes): a probe batch
        is run and measured, because activation memory depends on attention kernels and precision in
        ways a formula would miss. Free memory counts what PyTorch's cache holds but does not use."""
        size = self.loaded.config.img_size
        probe = torch.zeros((PROBE_IMAGES, size, size, 3), dtype=torch.uint8, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._forward(probe, self.depth, embeddings=True)
        torch.cuda.synchronize(self.device)
        per_image = (torch.cuda.max_memory_allocated(self.device) - before) / PROBE_IMAGES
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return float(per_image), float(free + cached)

    @staticmethod
    @contextlib.contextmanager
    def _ieee_fp32() -> Iterator[None]:
        """fp32 that is fp32 on a GPU: PyTorch lets cuDNN run fp32 convolutions in TF32 (10 mantissa bits)
        by default, so the patch embedding alone moved an H200's fp32 scores 2.2e-4 from the CPU's
        (benchmarks/gpu_check.py), past the reference tolerance. Set for the forward pass only, then
        restored: a library must not change its caller's global precision settings."""
        conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved

    def _forward(self, chunk: torch.Tensor, depth: int, embeddings: bool) -> ExitOutput:
        if self.device.type == "cuda" and chunk.device.type == "cpu":
            # uint8 over the bus (4x less than float32), from pinned memory, normalised on the GPU
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        pixels = normalize(chunk).to(self.device)
        strict = self.device.type == "cuda" and self.precision == "fp32"
        with (
            self._ieee_fp32() if strict else contextlib.nullcontext(),
            torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
            ),
        ):
            return self.model.forward_exits(pixels, depth, with_embedding=embeddings)

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
        """Score (N, 112, 112, 3) uint8 RGB images in one pass per chunk, stopping at `exit_depth`.
        `images` may already be on the scoring device (decoded there: `workers.device_decode`)."""
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
        for start in range(0, images.shape[0], self.batch_size):
            out = self._forward(images[start : start + self.batch_size], depth, embeddings)
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
