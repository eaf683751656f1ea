"""The scoring configuration: the model a run loads and everything its numbers depend on.

`scoring_config` turns checked options and the loaded model into the record whose fingerprint decides
whether two runs' rows may be mixed (resuming, `--since`): model hash and architecture, exit depth, fusion
and its weights, precision, decoding place, alignment, the size limit, the table's schema version.
"""

from __future__ import annotations

from typing import Any

from fiqa_curator.flows.options import ScoreOptions
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.quality_table import SCHEMA_VERSION
from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT
from fiqa_curator.workers.checkpoint import LoadedModel, load_model
from fiqa_curator.workers.config import ViTFIQAConfig
from fiqa_curator.workers.fusion import parse_fusion


def resolve_model(options: ScoreOptions) -> tuple[LoadedModel, str]:
    """(the loaded model, its checkpoint URL): loaded once on the driver, so that a bad checkpoint or
    config fails here, before any work."""
    checkpoint = options.checkpoint or str(BUNDLED_CHECKPOINT)
    arch: Any = options.architecture_file
    if options.mode and not options.arch:
        raise UserError("--mode goes with --arch (a preset); a JSON config states its own mode")
    if options.arch:
        arch = ViTFIQAConfig.preset(options.arch, mode=options.mode) if options.mode else options.arch
    return load_model(checkpoint, arch, storage_options=options.storage_options), checkpoint


def scoring_config(loaded: LoadedModel, options: ScoreOptions) -> dict[str, Any]:
    """What the numbers depend on: the fingerprint of this decides whether results may be mixed.
    `options.device` must be resolved ("cpu" or "cuda"; `flows.cluster.scoring_device`): it decides "auto"
    precision."""
    exit_depth = options.exit_depth or loaded.config.depth
    if not 1 <= exit_depth <= loaded.config.depth:
        raise UserError(f"--exit-depth must be in 1..{loaded.config.depth}, got {exit_depth}")
    if options.embeddings and exit_depth != loaded.config.depth:
        raise UserError(
            f"--embeddings needs the full depth ({loaded.config.depth}): the embedding is the output "
            f"of the whole model, and exit depth {exit_depth} stops before it"
        )
    if options.decode == "device" and options.align:
        raise UserError(
            "--decode device is for aligned crops; with --align photos are decoded where faces are found"
        )
    if options.precision == "auto" and options.device not in ("cpu", "cuda"):
        raise ValueError(
            "resolve the device (scoring_device) before the configuration: auto precision depends on it"
        )
    precision = (
        ("bf16" if options.device == "cuda" else "fp32") if options.precision == "auto" else options.precision
    )
    fusion = parse_fusion(options.fusion)
    weights = fusion.weights(exit_depth)  # rejects a wrong number of user weights now
    return {
        "model_sha256": loaded.sha256,
        "model_config": loaded.config.to_dict(),
        "exit_depth": exit_depth,
        "fusion": str(fusion),
        "fusion_weights": [round(float(w), 12) for w in weights],
        "max_pixels": options.max_pixels,
        "schema_version": SCHEMA_VERSION,
        "embeddings": options.embeddings,
        "align": options.align,
        # bf16 moves scores by up to a few percent of their spread, nvJPEG pixels by a level or two: a run
        # must not resume or carry over rows computed the other way
        "precision": precision,
        "decode": options.decode,
    }
