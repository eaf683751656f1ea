"""Input settings that the reading stage and the scoring options share, in a module light enough for the
command line to import (no numpy, no Pillow)."""

from __future__ import annotations

from typing import Literal, get_args

CPU_BATCH_SIZE = 64  # CPU throughput is flat above a few dozen images; larger batches only cost memory
# Only stops decompression bombs before decoding: a 112x112 face crop needs nothing near it.
DEFAULT_MAX_PIXELS = 64_000_000
AlignMode = Literal["largest", "all"]  # raw photos: the largest face, or every face (one row each)
ALIGN_MODES: tuple[str, ...] = get_args(AlignMode)
