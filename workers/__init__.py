"""Model-side building blocks of fiqa-curator.

This package owns everything that turns image bytes into quality scores on one machine: decoding and
preprocessing (`preprocess`), the ViT-FIQA network with EX-FIQA early exits (`model`), its architecture
description (`config`), checkpoint loading (`checkpoint`), exit fusion (`fusion`), the batch scoring API
(`scoring`), byte reading with retries (`io`) and the two pipeline stages Ray runs (`reading`, `stages`).
The model knows nothing of Ray, Prefect or object-store layouts.

Names are imported lazily: a Ray task that only reads and decodes bytes never pays for importing torch
and timm (several seconds per fresh worker process).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PRESETS": "fiqa_curator.workers.config",
    "ViTFIQAConfig": "fiqa_curator.workers.config",
    "CheckpointError": "fiqa_curator.workers.checkpoint",
    "LoadedModel": "fiqa_curator.workers.checkpoint",
    "load_model": "fiqa_curator.workers.checkpoint",
    "Fusion": "fiqa_curator.workers.fusion",
    "parse_fusion": "fiqa_curator.workers.fusion",
    "ExitOutput": "fiqa_curator.workers.model",
    "ViTFIQA": "fiqa_curator.workers.model",
    "DecodeStatus": "fiqa_curator.workers.preprocess",
    "DecodedImage": "fiqa_curator.workers.preprocess",
    "decode_face": "fiqa_curator.workers.preprocess",
    "normalize": "fiqa_curator.workers.preprocess",
    "QualityScorer": "fiqa_curator.workers.scoring",
    "ScoreResult": "fiqa_curator.workers.scoring",
}

__all__ = [  # noqa: RUF022 - grouped as _EXPORTS
    "PRESETS",
    "ViTFIQAConfig",
    "CheckpointError",
    "LoadedModel",
    "load_model",
    "Fusion",
    "parse_fusion",
    "ExitOutput",
    "ViTFIQA",
    "DecodeStatus",
    "DecodedImage",
    "decode_face",
    "normalize",
    "QualityScorer",
    "ScoreResult",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fiqa_curator.workers' has no attribute {name!r}")


if TYPE_CHECKING:
    from fiqa_curator.workers.checkpoint import CheckpointError, LoadedModel, load_model
    from fiqa_curator.workers.config import PRESETS, ViTFIQAConfig
    from fiqa_curator.workers.fusion import Fusion, parse_fusion
    from fiqa_curator.workers.model import ExitOutput, ViTFIQA
    from fiqa_curator.workers.preprocess import DecodedImage, DecodeStatus, decode_face, normalize
    from fiqa_curator.workers.scoring import QualityScorer, ScoreResult
