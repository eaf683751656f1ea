"""The ViT-FIQA network (official `backbones/vit_qs.py`, eval behaviour) with EX-FIQA early exits.

Built from timm's `Block` (pre-norm attention + MLP) and `PatchEmbed`, configured to match the official
module exactly: LayerNorm eps 1e-5, qkv without bias, ReLU6 MLP, 9x9 patches on 112x112 (floored grid). What
timm has no part for is here: the quality token that carries a position embedding, no class token, and the
two heads (`feature` for the face embedding, `head_qs` for the quality score). Parameter names equal the
official state-dict keys, so a released checkpoint loads with `load_state_dict` as it is.

`forward_exits` is the single pass of EX-FIQA: it runs blocks 1..L only and scores every exit l <= L with
the shared final `norm` and the model's own head.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from fiqa_curator.workers.config import ViTFIQAConfig

LAYER_NORM_EPS = 1e-5  # official code uses nn.LayerNorm defaults; timm's ViT default would be 1e-6
BATCH_NORM_EPS = 2e-5


@dataclass
class ExitOutput:
    """Result of one early-exit pass for a batch.

    exit_scores: (B, len(exits)) float32, column j is the score of exit `exits[j]` (1-based block index).
    embedding:   (B, D) float32 face embedding, only when asked for and the pass ran every block.
    """

    exits: tuple[int, ...]
    exit_scores: torch.Tensor
    embedding: torch.Tensor | None = None


class ViTFIQA(nn.Module):
    """ViT-FIQA in `token`, `crfiqa` or `full` mode. Use in eval mode: BatchNorm reads running statistics."""

    def __init__(self, config: ViTFIQAConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(
            img_size=config.img_size, patch_size=config.patch_size, in_chans=3, embed_dim=dim
        )
        if config.mode != "crfiqa":
            self.qs_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        norm_layer = partial(nn.LayerNorm, eps=LAYER_NORM_EPS)
        self.blocks = nn.ModuleList(
            Block(
                dim=dim,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=False,
                proj_bias=True,
                act_layer=nn.ReLU6,
                norm_layer=norm_layer,
            )
            for _ in range(config.depth)
        )
        self.norm = norm_layer(dim)
        feature_in = dim * (config.num_patches + (1 if config.mode == "full" else 0))
        self.feature = nn.Sequential(
            nn.Linear(feature_in, dim, bias=False),
            nn.BatchNorm1d(dim, eps=BATCH_NORM_EPS),
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim, eps=BATCH_NORM_EPS),
        )
        self.head_qs = nn.Sequential(nn.BatchNorm1d(dim, eps=BATCH_NORM_EPS), nn.Linear(dim, 1, bias=False))
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as the official module, so a fresh model is a plausible random ViT-FIQA.
        trunc_normal_(self.pos_embed, std=0.02)
        if self.config.mode != "crfiqa":
            nn.init.normal_(self.qs_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def depth(self) -> int:
        return self.config.depth

    # ---- building blocks -----------------------------------------------------------------------------
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) images -> (B, tokens, D) input of block 1."""
        tokens = self.patch_embed(pixels)
        if self.config.mode != "crfiqa":
            tokens = torch.cat((self.qs_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens + self.pos_embed

    def _flat_features(self, normed: torch.Tensor) -> torch.Tensor:
        """Normed tokens -> the flattened input of `feature` (token mode drops the quality token)."""
        if self.config.mode == "token":
            normed = normed[:, 1:]
        return normed.reshape(normed.shape[0], -1)

    def head(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Output of any block -> (embedding or None, quality (B,)), through the shared final norm.

        Token mode normalises only the quality token: LayerNorm acts per token, so this equals
        `norm(hidden)[:, 0]` at a fraction of the cost, and the embedding is left to the caller.
        The official code runs the final norm in float32; so do the heads here, under any autocast.
        """
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden = hidden.float()
            if self.config.mode == "token":
                quality = self.head_qs(self.norm(hidden[:, 0]))
                return None, quality.squeeze(1)
            embedding = self.feature(self._flat_features(self.norm(hidden)))
            return embedding, self.head_qs(embedding).squeeze(1)

    def embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> the face-recognition embedding (the official `feature` output)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.feature(self._flat_features(self.norm(hidden.float())))

    # ---- passes ------------------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The official forward: (embedding (B, D), quality (B, 1))."""
        out = self.forward_exits(pixels, self.depth, exits=[self.depth], with_embedding=True)
        assert out.embedding is not None
        return out.embedding, out.exit_scores

    def forward_exits(
        self,
        pixels: torch.Tensor,
        exit_depth: int | None = None,
        *,
        exits: Iterable[int] | None = None,
        with_embedding: bool = False,
    ) -> ExitOutput:
        """One pass through blocks 1..`exit_depth` only, scoring the requested exits (default: all 1..L).

        Blocks after `exit_depth` are never run. The embedding is the full model's `feature` output, so it
        can only be asked for when `exit_depth` equals the model depth.
        """
        depth = self.depth if exit_depth is None else int(exit_depth)
        if not 1 <= depth <= self.depth:
            raise ValueError(f"exit depth must be in 1..{self.depth}, got {exit_depth!r}")
        wanted = tuple(range(1, depth + 1)) if exits is None else tuple(sorted(set(int(e) for e in exits)))
        if not wanted or wanted[0] < 1 or wanted[-1] > depth:
            raise ValueError(f"exits must be a non-empty subset of 1..{depth}, got {exits!r}")
        if with_embedding and depth != self.depth:
            raise ValueError(
                f"the embedding is the output of the full model: ask for it at exit depth {self.depth}, "
                f"not {depth}"
            )
        wanted_set = set(wanted)
        hidden = self.embed(pixels)
        scores: list[torch.Tensor] = []
        embedding: torch.Tensor | None = None
        for index, block in enumerate(self.blocks[:depth], start=1):
            hidden = block(hidden)
            if index in wanted_set:
                exit_embedding, quality = self.head(hidden)
                scores.append(quality)
                if index == self.depth:
                    embedding = exit_embedding
        if with_embedding and embedding is None:
            embedding = self.embedding(hidden)  # token mode: `head` skipped the patch tokens
        return ExitOutput(
            exits=wanted,
            exit_scores=torch.stack(scores, dim=1),
            embedding=embedding if with_embedding else None,
        )

    @torch.no_grad()
    def quality_token_attention(self, pixels: torch.Tensor, exit_depth: int | None = None) -> torch.Tensor:
        """(B, L, grid, grid): at each block 1..L, the attention of the quality token over the patches,
        averaged over heads (token and full modes). Computed from the block's own qkv weights on the same
        pass that the scores take; the maps of a block sum, with the token's attention to itself, to 1."""
        if self.config.mode == "crfiqa":
            raise ValueError("crfiqa models have no quality token to attend from")
        depth = self.depth if exit_depth is None else int(exit_depth)
        hidden = self.embed(pixels)
        maps = []
        for block in self.blocks[:depth]:
            attention = block.attn
            normed = block.norm1(hidden)
            batch, tokens, dim = normed.shape
            heads = attention.num_heads
            qkv = attention.qkv(normed).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            query, key = qkv[0][:, :, :1], qkv[1]  # the quality token's query against every key
            weights = ((query @ key.transpose(-2, -1)) * attention.scale).softmax(
                dim=-1
            )  # (B, heads, 1, tokens)
            maps.append(weights.mean(dim=1)[:, 0, 1:])
            hidden = block(hidden)
        grid = self.config.grid_size
        return torch.stack(maps, dim=1).reshape(pixels.shape[0], depth, grid, grid)
