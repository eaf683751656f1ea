"""Checkpoint loading: formats, sources, config checks and the errors a user sees."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from fiqa_curator.workers import CheckpointError, QualityScorer, ViTFIQA, ViTFIQAConfig, load_model
from fiqa_curator.workers.checkpoint import save_checkpoint
from tests.conftest import TOLERANCE, ReferenceFixture

SMALL = ViTFIQAConfig(mode="token", embed_dim=32, depth=2, num_heads=4)


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_records_sha256_and_source(reference: ReferenceFixture) -> None:
    loaded = load_model(reference.checkpoint)
    assert loaded.sha256 == hashlib.sha256(reference.checkpoint.read_bytes()).hexdigest()
    assert loaded.source == str(reference.checkpoint)
    assert loaded.describe()["sha256"] == loaded.sha256


def test_from_fsspec_memory_url(reference: ReferenceFixture) -> None:
    url = f"memory://fiqa-tests/{reference.path.name}/model.pt"
    with fsspec.open(url, "wb") as handle:
        handle.write(reference.checkpoint.read_bytes())
    loaded = load_model(url, reference.path / "config.json")
    result = QualityScorer(loaded, device="cpu").score(reference.images)
    np.testing.assert_allclose(result.exit_scores, reference.block_quality, **TOLERANCE)


@pytest.mark.s3
def test_from_s3_on_a_real_server(reference: ReferenceFixture, s3_server, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/models/{reference.path.name}.pt"
    with fsspec.open(url, "wb", **s3_server.storage_options) as handle:
        handle.write(reference.checkpoint.read_bytes())
    loaded = load_model(url, reference.path / "config.json", storage_options=s3_server.storage_options)
    assert loaded.sha256 == hashlib.sha256(reference.checkpoint.read_bytes()).hexdigest()
    result = QualityScorer(loaded, device="cpu").score(reference.images)
    np.testing.assert_allclose(result.exit_scores, reference.block_quality, **TOLERANCE)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(
            f"s3://{s3_bucket}/models/absent.pt", "vit_s_qs", storage_options=s3_server.storage_options
        )


def test_module_prefix_and_mask_token(tmp_path: Path) -> None:
    model = ViTFIQA(SMALL)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.mask_token"] = torch.zeros(1, 1, 32)
    loaded = load_model(_save(state, tmp_path / "m.pt"), {"num_heads": 4})
    assert loaded.ignored_keys == ("mask_token",)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)


def test_missing_unexpected_and_mismatched_keys_are_all_named(tmp_path: Path) -> None:
    state = ViTFIQA(SMALL).state_dict()
    del state["blocks.1.attn.proj.bias"]
    state["blocks.0.attn.qkv.bias"] = torch.zeros(96)
    state["head_qs.1.weight"] = torch.zeros(2, 32)
    with pytest.raises(CheckpointError) as error:
        load_model(_save(state, tmp_path / "m.pt"), {"num_heads": 4})
    message = str(error.value)
    assert "missing keys (1): blocks.1.attn.proj.bias" in message
    assert "unexpected keys (1): blocks.0.attn.qkv.bias" in message
    assert "head_qs.1.weight: checkpoint (2, 32) vs model (1, 32)" in message


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": ViTFIQA(SMALL)}, path)  # a whole module needs pickled classes to load
    with pytest.raises(
        CheckpointError,
        match=r"refused: this file needs pickled Python code to load "
        r"\(fiqa_curator.workers.model.ViTFIQA\).*weights_only=True",
    ):
        load_model(path, {"num_heads": 4})


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path, "vit_s_qs")
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    for junk in (b"this is not a torch file", b"nope", b"PK\x03\x04 truncated zip"):
        path.write_bytes(junk)
        with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
            load_model(path, "vit_s_qs")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.pt", "vit_s_qs")
    torch.save(OrderedDict(weight=torch.zeros(1)), path)
    with pytest.raises(CheckpointError, match=r"not a ViT-FIQA state dict.*pos_embed"):
        load_model(path, "vit_s_qs")


def test_config_disagreements_are_errors(tmp_path: Path) -> None:
    path = _save(ViTFIQA(SMALL).state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="depth: config says 12, weights have 2 blocks"):
        load_model(path, {"num_heads": 4, "embed_dim": 32, "depth": 12})
    with pytest.raises(CheckpointError, match="embed_dim: config says 512, weights have 32"):
        load_model(path, "vit_s_qs")
    with pytest.raises(CheckpointError, match="mode: config says 'crfiqa', weights are 'token'"):
        load_model(path, {"num_heads": 4, "embed_dim": 32, "depth": 2, "mode": "crfiqa"})
    with pytest.raises(CheckpointError, match="mlp_ratio"):
        load_model(path, {"num_heads": 4, "embed_dim": 32, "depth": 2, "mlp_ratio": 2})
    with pytest.raises(CheckpointError, match="heads cannot be read"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no such model config or preset"):
        load_model(path, tmp_path / "absent.json")
    with pytest.raises(CheckpointError, match="not divisible"):
        load_model(path, {"num_heads": 5, "embed_dim": 32, "depth": 2})


def test_json_config_ignores_unknown_keys(tmp_path: Path) -> None:
    path = _save(ViTFIQA(SMALL).state_dict(), tmp_path / "m.pt")
    config = tmp_path / "arch.json"
    config.write_text(
        json.dumps({**SMALL.to_dict(), "n_images": 8, "state_dict_key_prefix": "", "extra": [1]})
    )
    assert load_model(path, config).config == SMALL
    config.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_model(path, config)


def test_modes_are_inferred_from_weights(tmp_path: Path) -> None:
    for mode in ("token", "crfiqa", "full"):
        config = dataclasses.replace(SMALL, mode=mode)
        path = _save(ViTFIQA(config).state_dict(), tmp_path / f"{mode}.pt")
        assert load_model(path, {"num_heads": 4}).config.mode == mode


@pytest.mark.slow
@pytest.mark.parametrize("preset,depth", [("vit_s_qs", 12), ("vit_b_qs", 24)])
def test_presets_load_released_sized_checkpoints(preset: str, depth: int) -> None:
    config = ViTFIQAConfig.preset(preset)
    assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (512, depth, 8, 9)
    model = ViTFIQA(config)
    url = f"memory://fiqa-tests/{preset}/vitfiqa_token.pt"
    sha = save_checkpoint(model, url)
    loaded = load_model(url, preset)
    assert loaded.sha256 == sha
    assert loaded.config == config
    assert sum(p.numel() for p in loaded.model.parameters()) == sum(p.numel() for p in model.parameters())
    fsspec.filesystem("memory").rm(url)


def test_the_model_is_checked_in_a_child_process(tmp_path: Path, monkeypatch) -> None:
    """`fiqa score` loads and checks the model in a spawned child (the driver never imports torch): the
    facts it hands back are the model's own, and a bad checkpoint fails with the same error as in process."""
    from fiqa_curator.flows.configuration import ModelCheck, resolve_model
    from fiqa_curator.flows.options import ScoreOptions
    from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT

    facts, checkpoint = resolve_model(ScoreOptions(input="in", output="out"))
    loaded = load_model(BUNDLED_CHECKPOINT)
    assert checkpoint == str(BUNDLED_CHECKPOINT)
    assert (facts.sha256, facts.config) == (loaded.sha256, loaded.config)
    assert facts.local_gpu == torch.cuda.is_available()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    check = ModelCheck(ScoreOptions(input="in", output="out", checkpoint=str(tmp_path / "bad.pt")))
    with pytest.raises(CheckpointError) as in_child:
        check.result()
    with pytest.raises(CheckpointError) as in_process:
        load_model(tmp_path / "bad.pt")
    assert str(in_child.value) == str(in_process.value)
    with pytest.raises(ValueError, match="--mode goes with --arch"):
        ModelCheck(ScoreOptions(input="in", output="out", mode="crfiqa"))
    # the check process is kept between runs; one that died (killed, out of memory) is replaced
    from fiqa_curator.flows import configuration

    checker = configuration._CHECKER[0].process
    checker.kill()
    checker.wait()
    assert resolve_model(ScoreOptions(input="in", output="out"))[0] == facts
    assert configuration._CHECKER[0].process.pid != checker.pid
    # by default (`fiqa score`: one run per process) it exits after its answer: torch is not kept beside
    # the driver while it scores
    monkeypatch.delenv("FIQA_KEEP_MODEL_CHECK")
    kept = configuration._CHECKER[0].process
    assert resolve_model(ScoreOptions(input="in", output="out"))[0] == facts
    assert not configuration._CHECKER and kept.wait(timeout=30) == 0
    assert resolve_model(ScoreOptions(input="in", output="out"))[0] == facts  # a new one, gone again
    assert not configuration._CHECKER


def test_the_reports_attention_maps_come_from_the_model_process(tmp_path: Path, monkeypatch) -> None:
    """The report asks the model process for its attention figure (the driver never imports torch): the
    maps are the model's own; a process kept after the model check (a short run), or started again and
    warmed once scoring is over (a long one), answers with the model it loaded and exits; one kept for a
    question that never comes is let go."""
    from fiqa_curator.flows import configuration
    from fiqa_curator.flows.options import ScoreOptions
    from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT
    from fiqa_curator.workers.preprocess import normalize

    monkeypatch.delenv("FIQA_KEEP_MODEL_CHECK")
    loaded = load_model(BUNDLED_CHECKPOINT)
    faces = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    checkpoint = tmp_path / "model.pt"
    shutil.copy(BUNDLED_CHECKPOINT, checkpoint)
    shutil.copy(BUNDLED_CHECKPOINT.with_name("config.json"), tmp_path / "config.json")
    options = ScoreOptions(input="in", output="out", checkpoint=str(checkpoint))
    check = configuration.ModelCheck(options, keep_for_report=True)
    assert check.result().config == loaded.config
    kept = configuration._CHECKER[0].process
    assert kept.poll() is None  # kept, idle, for the report
    checkpoint.unlink()  # the answer comes from the model the check loaded, not from the file again
    asked = configuration.AttentionMaps(str(checkpoint), loaded.config.to_dict(), None, faces, 5)
    expected = loaded.model.quality_token_attention(normalize(faces), 5).numpy()
    np.testing.assert_array_equal(asked.result(), expected)
    assert expected.shape == (3, 5, loaded.config.grid_size, loaded.config.grid_size)
    assert not configuration._CHECKER and kept.wait(timeout=30) == 0  # it answered, then exited
    # a longer run lets it go after planning and starts it again when scoring is over: warmed with the model
    shutil.copy(BUNDLED_CHECKPOINT, checkpoint)
    configuration.warm_model_process(str(checkpoint), loaded.config.to_dict())
    configuration._ASKING.submit(lambda: None).result()  # warmed
    checkpoint.unlink()
    asked = configuration.AttentionMaps(str(checkpoint), loaded.config.to_dict(), None, faces, 5)
    np.testing.assert_array_equal(asked.result(), expected)
    assert not configuration._CHECKER
    # and one kept for a question that never comes is let go
    configuration.ModelCheck(ScoreOptions(input="in", output="out"), keep_for_report=True).result()
    kept = configuration._CHECKER[0].process
    configuration.release_model_process()
    configuration._ASKING.submit(lambda: None).result()  # after the questions already asked
    assert not configuration._CHECKER and kept.wait(timeout=30) == 0


def test_an_answer_does_not_wait_for_the_model_process_to_exit(monkeypatch) -> None:
    """A model process that is not kept exits after its answer; the answer is handed over at once and the
    process reaped afterwards on the same thread (a process with torch and a model takes about a second to
    exit, which the report used to wait for). Here the process is one that does not exit until killed."""
    import subprocess

    from fiqa_curator.flows import configuration

    monkeypatch.delenv("FIQA_KEEP_MODEL_CHECK")
    configuration.release_model_process()
    configuration._ASKING.submit(lambda: None).result()
    assert not configuration._CHECKER

    started: list[subprocess.Popen] = []

    class Lingering:
        """Answers at once; its process stays until the test kills it."""

        def __init__(self) -> None:
            self.process = subprocess.Popen(["sleep", "600"])
            started.append(self.process)

        def ask(self, request: tuple) -> str:
            return f"answer to {request[1]}"

    monkeypatch.setattr(configuration, "_CheckerProcess", Lingering)
    answer = configuration._ASKING.submit(configuration._ask, ("attention",))
    assert answer.result(timeout=60) == "answer to attention"
    assert not configuration._CHECKER
    (lingering,) = started
    reaped = configuration._ASKING.submit(lambda: None)  # queued behind the reaping
    assert not reaped.done()  # answered while its process was still there, and waiting for it
    lingering.kill()
    reaped.result(timeout=60)
    assert lingering.returncode == -9  # reaped by the model-check thread: no zombie left
