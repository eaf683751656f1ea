"""Loading official ViT-FIQA checkpoints (plain state dicts) from a local path or any fsspec URL.

Owns: reading the bytes (and their sha256), `torch.load(weights_only=True)`, key clean-up (`module.`
prefix, training-only `mask_token`), inferring mode, width and depth from the weights, checking them against
the architecture config, and a strict key/shape comparison whose error names everything that does not fit.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch

from fiqa_curator.schemas.errors import UserError
from fiqa_curator.workers.config import PRESETS, Mode, ViTFIQAConfig, find_sidecar_config
from fiqa_curator.workers.model import ViTFIQA

WRAPPER_PREFIX = "module."
TRAINING_ONLY_KEYS = frozenset({"mask_token"})
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is not a ViT-FIQA state dict, or does not fit the architecture."""


@dataclass
class LoadedModel:
    """A ViT-FIQA network in eval mode plus where it came from."""

    model: ViTFIQA
    config: ViTFIQAConfig
    source: str
    sha256: str
    ignored_keys: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, **self.config.to_dict()}


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Whole content of a local path or fsspec URL (s3://, gs://, memory://, ...)."""
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as handle:
            return handle.read()
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint not found: {url}") from error
    except Exception as error:  # any fsspec backend error: permissions, network, bad URL
        raise CheckpointError(f"cannot read checkpoint {url}: {type(error).__name__}: {error}") from error


def load_state_dict_bytes(data: bytes, source: str = "<bytes>") -> dict[str, torch.Tensor]:
    """Deserialize with `weights_only=True`; anything needing pickled code is refused."""
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch reports every weights-only failure this way; only "Unsupported global" means code is needed.
        needed = _UNSUPPORTED_GLOBAL.search(str(error))
        if needed is None:
            raise CheckpointError(
                f"{source}: not a readable torch checkpoint (corrupt or not a torch file)"
            ) from error
        raise CheckpointError(
            f"{source}: refused: this file needs pickled Python code to load ({needed.group(1)}), and "
            f"fiqa-curator only loads plain tensors (torch.load weights_only=True). Re-save it as a state "
            f"dict: torch.save(model.state_dict(), path)."
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"{source}: not a readable torch checkpoint: {type(error).__name__}: {error}"
        ) from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]  # common training-script wrapper around a state dict
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{source}: expected a state dict (a mapping of names to tensors)")
    return dict(loaded)


def clean_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Strip a `module.` prefix (DataParallel/DDP) and drop training-only keys; return (clean, ignored)."""
    keys = list(state_dict)
    if keys and all(key.startswith(WRAPPER_PREFIX) for key in keys):
        state_dict = {key[len(WRAPPER_PREFIX) :]: value for key, value in state_dict.items()}
    # float32 like the official model, whatever precision the file was saved in
    clean = {
        key: value.float() if value.is_floating_point() else value
        for key, value in state_dict.items()
        if key not in TRAINING_ONLY_KEYS
    }
    ignored = tuple(sorted(set(state_dict) - set(clean)))
    return clean, ignored


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights say: mode, embed_dim, depth, patch_size, num_patches, mlp hidden width."""
    try:
        pos_embed = state_dict["pos_embed"]
        patch_weight = state_dict["patch_embed.proj.weight"]
        feature_in = state_dict["feature.0.weight"].shape[1]
    except KeyError as error:
        raise CheckpointError(
            f"not a ViT-FIQA state dict: key {error.args[0]!r} is missing "
            f"(keys present: {', '.join(sorted(state_dict)[:8])}...)"
        ) from error
    dim = int(pos_embed.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))), default=-1)
    has_token = "qs_token" in state_dict
    num_patches = int(pos_embed.shape[1]) - (1 if has_token else 0)
    mode: Mode
    if not has_token:
        mode = "crfiqa"
    elif feature_in == dim * (num_patches + 1):
        mode = "full"
    else:
        mode = "token"
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    return {
        "mode": mode,
        "embed_dim": dim,
        "depth": depth,
        "patch_size": int(patch_weight.shape[-1]),
        "num_patches": num_patches,
        "mlp_hidden_dim": int(fc1.shape[0]) if fc1 is not None else None,
    }


def resolve_config(
    inferred: Mapping[str, Any], arch: str | ViTFIQAConfig | Mapping[str, Any] | Path | None
) -> ViTFIQAConfig:
    """Combine an architecture source with what the weights say; any disagreement is an error."""
    if arch is None:
        raise CheckpointError(
            "the number of attention heads cannot be read from the weights: give a preset "
            f"({', '.join(sorted(PRESETS))}) or a JSON model config"
        )
    if isinstance(arch, str | Path) and str(arch) in PRESETS:
        config = ViTFIQAConfig.preset(str(arch), mode=inferred["mode"])
        explicit_mode = False
    elif isinstance(arch, ViTFIQAConfig):
        config, explicit_mode = arch, True
    else:
        values = arch if isinstance(arch, Mapping) else _read_config_file(arch)
        # Keys the config leaves out are taken from the weights; the ones it gives are checked below.
        from_weights = {k: inferred[k] for k in ("mode", "embed_dim", "depth", "patch_size")}
        if inferred.get("mlp_hidden_dim"):
            from_weights["mlp_ratio"] = inferred["mlp_hidden_dim"] / inferred["embed_dim"]
        try:
            config = ViTFIQAConfig.from_dict({**from_weights, **values})
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"invalid model config {arch}: {error}") from error
        explicit_mode = "mode" in values

    problems = []
    if explicit_mode and config.mode != inferred["mode"]:
        problems.append(f"mode: config says {config.mode!r}, weights are {inferred['mode']!r}")
    if config.embed_dim != inferred["embed_dim"]:
        problems.append(f"embed_dim: config says {config.embed_dim}, weights have {inferred['embed_dim']}")
    if config.depth != inferred["depth"]:
        problems.append(f"depth: config says {config.depth}, weights have {inferred['depth']} blocks")
    if config.patch_size != inferred["patch_size"]:
        problems.append(f"patch_size: config says {config.patch_size}, weights have {inferred['patch_size']}")
    if config.num_patches != inferred["num_patches"]:
        problems.append(
            f"patches: img_size {config.img_size} / patch {config.patch_size} gives {config.num_patches}, "
            f"pos_embed has {inferred['num_patches']}"
        )
    hidden = inferred.get("mlp_hidden_dim")
    if hidden is not None and config.mlp_hidden_dim != hidden:
        problems.append(
            f"mlp_ratio: config gives hidden width {config.mlp_hidden_dim}, weights have {hidden}"
        )
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(problems))
    return config


def _read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no such model config or preset: {path} (presets: {', '.join(sorted(PRESETS))})"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointError(f"invalid model config {path}: not JSON ({error})") from error
    if not isinstance(values, dict):
        raise CheckpointError(f"invalid model config {path}: expected a JSON object")
    return values


def _check_keys(model: ViTFIQA, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise CheckpointError("checkpoint does not fit the ViT-FIQA architecture:\n  " + "\n  ".join(lines))


def build_model(
    state_dict: Mapping[str, torch.Tensor],
    arch: str | ViTFIQAConfig | Mapping[str, Any] | Path | None,
) -> tuple[ViTFIQA, ViTFIQAConfig, tuple[str, ...]]:
    """A model in eval mode with the given weights; see `load_model`."""
    clean, ignored = clean_state_dict(state_dict)
    config = resolve_config(infer_architecture(clean), arch)
    # Built on the meta device: no memory and no random initialisation (seconds for ViT-S) for weights
    # that the checkpoint replaces anyway; `assign=True` then adopts the loaded tensors as parameters.
    with torch.device("meta"):
        model = ViTFIQA(config)
    _check_keys(model, clean)
    model.load_state_dict(clean, strict=True, assign=True)
    model.eval()
    return model, config, ignored


def load_model(
    source: str | Path,
    arch: str | ViTFIQAConfig | Mapping[str, Any] | Path | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load an official ViT-FIQA state dict.

    source: local path or fsspec URL of `model.pt`.
    arch:   a preset name (`vit_s_qs`, `vit_b_qs`), a JSON config path, a mapping, or a `ViTFIQAConfig`.
            When None, a `config.json` beside a local checkpoint is used. Mode, width and depth are always
            read from the weights and checked against it.
    """
    url = str(source)
    data = read_bytes(url, storage_options)
    if arch is None:
        arch = find_sidecar_config(url)
    state_dict = load_state_dict_bytes(data, url)
    model, config, ignored = build_model(state_dict, arch)
    return LoadedModel(
        model=model, config=config, source=url, sha256=hashlib.sha256(data).hexdigest(), ignored_keys=ignored
    )


def save_checkpoint(
    model: ViTFIQA, path: str | Path, *, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Save in the official format (a plain state dict); returns the sha256 of the written bytes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    with fsspec.open(str(path), "wb", **dict(storage_options or {})) as handle:
        handle.write(data)
    return hashlib.sha256(data).hexdigest()
