"""Files shipped with the package: the default checkpoint used when none is given.

`demo/` holds the demo model: a small ViT-FIQA (token mode, dim 64, depth 12, heads 4) in the official
format, trained on CPU on faces that ship inside Python packages by `python -m fiqa_curator.demo_kit.train`. A
demonstration, not for production: see `demo/MODEL_CARD.md`.
"""

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "demo"
BUNDLED_CHECKPOINT = BUNDLED_DIR / "model.pt"
