"""An independent, deliberately literal ViT-FIQA implementation written from the architecture notes
(shared/docs/VITFIQA.md), used as an oracle for configurations that have no official fixture.

It shares no code with `workers.model` (no timm, no fused attention, explicit per-exit passes, the way the
official EX-FIQA scripts score one exit per forward) so a bug in one is unlikely to hide in the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _layer_norm(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _batch_norm(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    mean, var = sd[f"{name}.running_mean"], sd[f"{name}.running_var"]
    return (x - mean) / torch.sqrt(var + 2e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _block(x: torch.Tensor, sd: dict, i: int, heads: int) -> torch.Tensor:
    p = f"blocks.{i}"
    b, n, d = x.shape
    h = _layer_norm(x, sd, f"{p}.norm1")
    qkv = (h @ sd[f"{p}.attn.qkv.weight"].T).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(b, n, d)
    x = x + h @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"]
    h = _layer_norm(x, sd, f"{p}.norm2")
    h = torch.clamp(h @ sd[f"{p}.mlp.fc1.weight"].T + sd[f"{p}.mlp.fc1.bias"], 0.0, 6.0)
    return x + h @ sd[f"{p}.mlp.fc2.weight"].T + sd[f"{p}.mlp.fc2.bias"]


def reference_forward(
    images_uint8: torch.Tensor, sd: dict, *, mode: str, patch_size: int, num_heads: int, exit_at: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, quality) of the model truncated after block `exit_at`, as EX-FIQA scores one exit."""
    sd = {k.removeprefix("module."): v.double() for k, v in sd.items() if "mask_token" not in k}
    x = images_uint8.permute(0, 3, 1, 2).double() / 255.0
    x = (x - 0.5) / 0.5
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    x = x.flatten(2).transpose(1, 2)
    b = x.shape[0]
    if mode != "crfiqa":
        x = torch.cat([sd["qs_token"].expand(b, -1, -1), x], dim=1)
    x = x + sd["pos_embed"]
    for i in range(exit_at):
        x = _block(x, sd, i, num_heads)
    x = _layer_norm(x, sd, "norm")
    flat = x[:, 1:] if mode == "token" else x
    feat = flat.reshape(b, -1) @ sd["feature.0.weight"].T
    feat = _batch_norm(feat, sd, "feature.1")
    feat = _batch_norm(feat @ sd["feature.2.weight"].T, sd, "feature.3")
    qs_in = x[:, 0] if mode == "token" else feat
    quality = _batch_norm(qs_in, sd, "head_qs.0") @ sd["head_qs.1.weight"].T
    return feat.float(), quality.squeeze(1).float()


def randomize_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Non-trivial values for every parameter and BatchNorm statistic, so every part affects the output."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
            continue
        noise = torch.randn(value.shape, generator=generator)
        if key.endswith("running_var"):
            state[key] = 0.5 + noise.abs()
        elif key.endswith("running_mean"):
            state[key] = 0.1 * noise
        elif key.endswith(".weight") and value.ndim == 1:  # LayerNorm / BatchNorm scale
            state[key] = 1.0 + 0.2 * noise
        elif key.endswith(".bias") and value.ndim == 1:
            state[key] = 0.1 * noise
        else:
            fan_in = math.prod(value.shape[1:]) if value.ndim > 1 else value.shape[-1]
            state[key] = noise / math.sqrt(fan_in)
    return state
