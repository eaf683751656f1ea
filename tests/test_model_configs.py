"""The model against an independent implementation of the architecture notes, on configurations that
have no official fixture: other depths, widths, head counts, MLP ratios, patch sizes, `full` mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fiqa_curator.workers import QualityScorer, ViTFIQA, ViTFIQAConfig, load_model
from tests.reference_vitfiqa import randomize_state_dict, reference_forward

TOLERANCE = {"atol": 2e-5, "rtol": 1e-3}

CONFIGS = [
    ViTFIQAConfig(mode="token", embed_dim=48, depth=3, num_heads=3),
    ViTFIQAConfig(mode="crfiqa", embed_dim=40, depth=5, num_heads=2, mlp_ratio=2.0),
    ViTFIQAConfig(mode="full", embed_dim=64, depth=4, num_heads=8),
    ViTFIQAConfig(mode="full", embed_dim=32, depth=1, num_heads=1, mlp_ratio=3.0),
    ViTFIQAConfig(mode="token", embed_dim=32, depth=7, num_heads=4, patch_size=8),
    ViTFIQAConfig(mode="crfiqa", embed_dim=24, depth=2, num_heads=6, img_size=56, patch_size=7),
]


def _images(count: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c.mode}-d{c.embed_dim}-L{c.depth}-h{c.num_heads}"
)
@pytest.mark.parametrize("prefix", ["", "module."])
def test_matches_independent_reference(config: ViTFIQAConfig, prefix: str, tmp_path: Path) -> None:
    state = randomize_state_dict(ViTFIQA(config), seed=config.depth * 100 + config.embed_dim)
    if config.mode != "crfiqa":
        state["mask_token"] = torch.randn(1, 1, config.embed_dim)  # training-only, must be ignored
    path = tmp_path / "model.pt"
    torch.save({prefix + key: value for key, value in state.items()}, path)

    arch = {k: v for k, v in config.to_dict().items() if k != "mode"}  # mode comes from the weights
    loaded = load_model(path, arch)
    assert loaded.config == config
    images = _images(5, config.img_size, seed=config.depth)
    scorer = QualityScorer(loaded, device="cpu", batch_size=2)
    full = scorer.score(images, embeddings=True)
    for exit_at in range(1, config.depth + 1):
        ref_embedding, ref_quality = reference_forward(
            torch.from_numpy(images),
            state,
            mode=config.mode,
            patch_size=config.patch_size,
            num_heads=config.num_heads,
            exit_at=exit_at,
        )
        np.testing.assert_allclose(full.exit_scores[:, exit_at - 1], ref_quality.numpy(), **TOLERANCE)
        partial = scorer.score(images, exit_depth=exit_at)
        np.testing.assert_allclose(partial.exit_scores, full.exit_scores[:, :exit_at], **TOLERANCE)
    np.testing.assert_allclose(full.embedding, ref_embedding.numpy(), **TOLERANCE)
    # the oracle is sensitive: a different head count gives different scores
    if config.num_heads > 1:
        _, wrong = reference_forward(
            torch.from_numpy(images),
            state,
            mode=config.mode,
            patch_size=config.patch_size,
            num_heads=1,
            exit_at=config.depth,
        )
        assert not np.allclose(full.fused["final"], wrong.numpy(), **TOLERANCE)


def test_blocks_after_the_exit_depth_never_run() -> None:
    config = ViTFIQAConfig(embed_dim=32, depth=6, num_heads=4)
    model = ViTFIQA(config).eval()
    calls: list[int] = []
    for index, block in enumerate(model.blocks, start=1):
        block.register_forward_pre_hook(lambda _m, _a, index=index: calls.append(index))
    pixels = torch.zeros(2, 3, 112, 112)
    for exit_depth in range(1, config.depth + 1):
        calls.clear()
        out = model.forward_exits(pixels, exit_depth)
        assert calls == list(range(1, exit_depth + 1))
        assert out.exits == tuple(range(1, exit_depth + 1))

    # Stronger: blocks after L are replaced by modules that fail when called, and the pass still works.
    class Tripwire(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("a block after the exit depth was run")

    for index in range(3, config.depth):
        model.blocks[index] = Tripwire()
    assert model.forward_exits(pixels, 3).exit_scores.shape == (2, 3)
    with pytest.raises(AssertionError, match="after the exit depth"):
        model.forward_exits(pixels, 4)


def test_exit_selection_and_embedding_rules() -> None:
    model = ViTFIQA(ViTFIQAConfig(embed_dim=32, depth=4, num_heads=4)).eval()
    pixels = torch.randn(2, 3, 112, 112)
    all_exits = model.forward_exits(pixels, 4).exit_scores
    only = model.forward_exits(pixels, 4, exits=[2, 4])
    assert only.exits == (2, 4)
    torch.testing.assert_close(only.exit_scores, all_exits[:, [1, 3]])
    with pytest.raises(ValueError, match="full model"):
        model.forward_exits(pixels, 3, with_embedding=True)
    with pytest.raises(ValueError, match="exit depth"):
        model.forward_exits(pixels, 5)
    with pytest.raises(ValueError, match="exit depth"):
        model.forward_exits(pixels, 0)
    with pytest.raises(ValueError, match="exits"):
        model.forward_exits(pixels, 2, exits=[3])
    assert model.forward_exits(pixels, 4, with_embedding=True).embedding.shape == (2, 32)


def test_quality_token_attention_maps() -> None:
    config = ViTFIQAConfig(mode="token", embed_dim=32, depth=3, num_heads=4)
    model = ViTFIQA(config).eval()
    state = randomize_state_dict(model, seed=9)
    model.load_state_dict(state)
    images = torch.from_numpy(_images(2, 112, seed=5))
    pixels = (images.permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.5
    maps = model.quality_token_attention(pixels.float(), exit_depth=2)
    assert maps.shape == (2, 2, 12, 12)
    assert torch.all(maps >= 0) and torch.all(maps.sum(dim=(2, 3)) <= 1.0 + 1e-6)
    # independent recomputation of block 1: LayerNorm, qkv without bias, softmax(q k^T / sqrt(d))
    x = (
        torch.nn.functional.conv2d(
            pixels,
            state["patch_embed.proj.weight"].double(),
            state["patch_embed.proj.bias"].double(),
            stride=9,
        )
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([state["qs_token"].double().expand(2, -1, -1), x], dim=1) + state["pos_embed"].double()
    h = torch.nn.functional.layer_norm(
        x, (32,), state["blocks.0.norm1.weight"].double(), state["blocks.0.norm1.bias"].double(), eps=1e-5
    )
    qkv = (h @ state["blocks.0.attn.qkv.weight"].double().T).reshape(2, 145, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = ((qkv[0] @ qkv[1].transpose(-2, -1)) * 8**-0.5).softmax(-1)[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(maps[:, 0].reshape(2, -1).double(), weights, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no quality token"):
        ViTFIQA(ViTFIQAConfig(mode="crfiqa", embed_dim=32, depth=1, num_heads=4)).quality_token_attention(
            pixels.float()
        )
