"""Model-side building blocks of fiqa-curator.

This package owns everything that turns image bytes into quality scores on one machine: decoding and
preprocessing (`preprocess`), the ViT-FIQA network with EX-FIQA early exits (`model`), its architecture
description (`config`), checkpoint loading (`checkpoint`), exit fusion (`fusion`) and the batch scoring
API (`scoring`). It knows nothing of Ray, Prefect or object-store layouts; `checkpoint` only uses fsspec
to read one file.
"""

from workers.checkpoint import CheckpointError, LoadedModel, load_model
from workers.config import PRESETS, ViTFIQAConfig
from workers.fusion import Fusion, parse_fusion
from workers.model import ExitOutput, ViTFIQA
from workers.preprocess import DecodedImage, DecodeStatus, decode_face, normalize
from workers.scoring import QualityScorer, ScoreResult

__all__ = [
    "PRESETS",
    "CheckpointError",
    "DecodeStatus",
    "DecodedImage",
    "ExitOutput",
    "Fusion",
    "LoadedModel",
    "QualityScorer",
    "ScoreResult",
    "ViTFIQA",
    "ViTFIQAConfig",
    "decode_face",
    "load_model",
    "normalize",
    "parse_fusion",
]
