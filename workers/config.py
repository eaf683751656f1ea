"""Architecture description of a ViT-FIQA network: presets, JSON configs and compute cost.

The number of attention heads cannot be read from a checkpoint, so every model is built from a
`ViTFIQAConfig`; `checkpoint` fills in what the weights say (mode, width, depth) and checks it against this.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fiqa_curator.schemas.errors import UserError

Mode = Literal["token", "crfiqa", "full"]
MODES: tuple[str, ...] = ("token", "crfiqa", "full")
CONFIG_KEYS: tuple[str, ...] = (
    "mode",
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
)


@dataclass(frozen=True)
class ViTFIQAConfig:
    """Hyper-parameters of the official `backbones/vit_qs.py` VisionTransformer."""

    mode: Mode = "token"
    img_size: int = 112
    patch_size: int = 9
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise UserError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.patch_size > self.img_size:
            raise UserError(f"patch_size {self.patch_size} is larger than img_size {self.img_size}")
        if self.mlp_ratio <= 0:
            raise UserError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def grid_size(self) -> int:
        # The official PatchEmbed floors: with 112/9 the last 4 rows and columns are never seen.
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.mode == "crfiqa" else 1

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTFIQAConfig:
        """Build from a mapping with the fixture config keys; unknown keys are ignored."""
        known = {key: values[key] for key in CONFIG_KEYS if key in values}
        if "mlp_ratio" in known:
            known["mlp_ratio"] = float(known["mlp_ratio"])
        return cls(**known)

    @classmethod
    def preset(cls, name: str, mode: Mode = "token") -> ViTFIQAConfig:
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], "mode": mode})

    # ---- compute cost ------------------------------------------------------------------------------
    def block_flops(self) -> float:
        """FLOPs (2 per multiply-add) of one transformer block for one image."""
        n, d, h = self.num_tokens, self.embed_dim, self.mlp_hidden_dim
        linear = 2 * n * d * (3 * d) + 2 * n * d * d + 2 * n * d * h * 2
        attention = 2 * 2 * n * n * d  # q @ k^T and attn @ v over all heads
        return float(linear + attention)

    def exit_head_flops(self) -> float:
        """FLOPs of one EX-FIQA exit head (final norm + the model's own head) for one image."""
        d = self.embed_dim
        if self.mode == "token":
            return float(2 * d + 2 * d)  # BatchNorm (affine) + Linear(D->1) on the quality token
        feature_in = d * (self.num_patches + (1 if self.mode == "full" else 0))
        return float(2 * feature_in * d + 2 * d * d + 2 * d)

    def flops_at_exit(self, exit_depth: int, *, all_exit_heads: bool = True) -> float:
        """FLOPs per image of one pass that runs blocks 1..L and scores exits 1..L (or only L)."""
        d, p = self.embed_dim, self.patch_size
        patch_embed = 2 * self.num_patches * d * 3 * p * p
        heads = exit_depth if all_exit_heads else 1
        return float(patch_embed + exit_depth * self.block_flops() + heads * self.exit_head_flops())


def _load_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for entry in resources.files("fiqa_curator.workers.presets").iterdir():
        if entry.name.endswith(".json"):
            presets[entry.name.removesuffix(".json")] = json.loads(entry.read_text(encoding="utf-8"))
    return presets


PRESETS: dict[str, dict[str, Any]] = _load_presets()


def local_path(url: str) -> Path | None:
    """The path of a URL on this machine's disks (a plain path or file://), None for any other store."""
    if "://" in url and not url.startswith("file://"):
        return None
    return Path(url.removeprefix("file://"))


def find_sidecar_config(url: str) -> Path | None:
    """`<dir>/config.json` next to a local checkpoint, the layout of the official fixtures and our bundle."""
    path = local_path(url)
    candidate = path.parent / "config.json" if path is not None else None
    return candidate if candidate is not None and candidate.is_file() else None
