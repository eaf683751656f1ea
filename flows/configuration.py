"""The scoring configuration: the model a run loads and everything its numbers depend on.

`ModelCheck` loads and checks the model in a child process and hands back only what the driver needs of
it (`ModelFacts`: the architecture, the weights' hash, whether this machine has a GPU): the driver
never imports torch (about 450 MB of its memory and 3 s of its start), and the check runs while Prefect's
server and Ray start. The same process answers the report's one other question for the model
(`AttentionMaps`: the quality token's attention over a few faces), while the report draws the rest.
`check_before_start` checks what needs no model (paths, and options against a declared architecture) in
a blink. `scoring_config` turns checked options and those facts into the record whose fingerprint
decides whether two runs' rows may be mixed (resuming, `--since`): model hash and architecture, exit
depth, fusion and its weights, precision, decoding place, alignment, the size limit, the table's schema
version.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fiqa_curator.flows.options import ScoreOptions
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.quality_table import SCHEMA_VERSION
from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT
from fiqa_curator.workers.config import PRESETS, ViTFIQAConfig, find_sidecar_config, local_path
from fiqa_curator.workers.fusion import Fusion, parse_fusion


@dataclass(frozen=True)
class ModelFacts:
    """What the driver needs of the model, which it does not load: its architecture, the hash of its
    weights, and whether torch sees a GPU on this machine (for `--device auto` without a Ray cluster)."""

    config: ViTFIQAConfig
    sha256: str
    local_gpu: bool


def check_model(checkpoint: str, arch: Any, storage_options: Mapping[str, Any]) -> ModelFacts:
    """Load the model as the actors will and check it (`workers.checkpoint.load_model`): what runs in the
    child process. Raises CheckpointError / UserError for a bad checkpoint or architecture."""
    import torch

    from fiqa_curator.workers.checkpoint import load_model

    loaded = load_model(checkpoint, arch, storage_options=storage_options)
    _LOADED.clear()  # kept for the report's attention maps, when the process is kept for them
    _LOADED[_model_key(checkpoint, loaded.config.to_dict())] = loaded.model
    return ModelFacts(loaded.config, loaded.sha256, torch.cuda.is_available())


class ModelCheck:
    """`check_model` for a run's options in the driver's model-check process, asked now; `result()` waits for
    the answer (and raises what the check raised)."""

    def __init__(self, options: ScoreOptions, *, keep_for_report: bool = False) -> None:
        """keep_for_report: the process stays, idle, with torch imported and the model loaded (~0.7 GB and
        the model's size), until the report's `AttentionMaps` or `release_model_process`: the report then
        needs no new start (~5 s of torch and timm's imports and the load)."""
        self.checkpoint = options.checkpoint or str(BUNDLED_CHECKPOINT)
        request = ("check", self.checkpoint, _arch_option(options), dict(options.storage_options))
        self._answer = _ASKING.submit(_ask, request, keep=keep_for_report)

    def result(self) -> ModelFacts:
        return self._answer.result()

    def close(self) -> None:
        """Not needed after all (the run failed before the flow asked for it)."""
        self._answer.cancel()


class AttentionMaps:
    """`attention_maps` for a few faces in the model process, asked now; `result()` waits for the maps (and
    raises what the model process raised: a checkpoint moved since the run, say)."""

    def __init__(
        self,
        checkpoint: str,
        config: Mapping[str, Any],
        storage_options: Mapping[str, Any] | None,
        faces: np.ndarray,
        exit_depth: int,
    ) -> None:
        request = ("attention", checkpoint, dict(config), dict(storage_options or {}), faces, exit_depth)
        self._answer = _ASKING.submit(_ask, request)

    def result(self) -> np.ndarray:
        return self._answer.result()


def attention_maps(
    checkpoint: str,
    config: Mapping[str, Any],
    storage_options: Mapping[str, Any],
    faces: np.ndarray,
    exit_depth: int,
) -> np.ndarray:
    """(faces, exits, grid, grid): the quality token's attention over the patches at every exit up to
    `exit_depth`, for uint8 faces (N, H, W, 3) of the model's input size; what runs in the model process."""
    import torch

    from fiqa_curator.workers.preprocess import normalize

    # One thread: a few faces are too small a job to split, and the report asks while the driver draws its
    # figures; two threads on a busy 2-core machine took 0.85 s for four faces against 0.40 s (0.26 s
    # for either when idle), time the report waits (docs/benchmarks.md).
    torch.set_num_threads(1)
    model = _model_for(checkpoint, config, storage_options)
    return model.quality_token_attention(normalize(faces), exit_depth).numpy()


# in the model process: the model its check loaded, for the report's attention maps
_LOADED: dict[tuple[str, str], Any] = {}


def _model_key(checkpoint: str, config: Mapping[str, Any]) -> tuple[str, str]:
    return checkpoint, json.dumps(dict(config), sort_keys=True)


def _model_for(checkpoint: str, config: Mapping[str, Any], storage_options: Mapping[str, Any]) -> Any:
    """The ViTFIQA network of this checkpoint and architecture: the one the model check loaded when it is
    the same, else loaded now (and kept instead)."""
    from fiqa_curator.workers.checkpoint import load_model

    key = _model_key(checkpoint, config)
    if key not in _LOADED:
        _LOADED.clear()
        architecture = ViTFIQAConfig.from_dict(dict(config))
        _LOADED[key] = load_model(checkpoint, architecture, storage_options=storage_options).model
    return _LOADED[key]


class ModelCheckDied(RuntimeError):
    """The model-check process ended without answering (killed, out of memory, a broken install)."""


class _CheckerProcess:
    """`python -m fiqa_curator.flows.configuration`: a plain child process (not `multiprocessing`, whose
    spawn runs the parent's main script again, which a user's script without a `__main__` guard does not
    survive) that answers check requests, pickled and length-prefixed, on its stdin and stdout. It exits
    after its answer (torch and the model, ~450 MB, are not kept beside the driver while it scores), or,
    with FIQA_KEEP_MODEL_CHECK=1, stays for the driver's next run until its stdin closes: a process that
    runs many flows (the tests) pays its start and torch's import once."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fiqa_curator.flows.configuration"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # its own session: a Ctrl-C in the terminal is the driver's to handle (it may wait through a
            # run, idle); it exits when the driver closes its stdin or dies
            start_new_session=True,
        )

    def ask(self, request: tuple[Any, ...]) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            _send(self.process.stdin, request)
            ok, answer = _receive(self.process.stdout)
        except (OSError, EOFError) as error:
            code = self.process.poll()
            raise ModelCheckDied(
                f"the model-check process ended (exit code {code}) before answering: see its messages above"
            ) from error
        if not ok:
            raise answer
        return answer


_ASKING = ThreadPoolExecutor(1, thread_name_prefix="fiqa-model-check")  # one question at a time
_CHECKER: list[_CheckerProcess] = []  # started on first use


KEEP_CHECKER_ENV = "FIQA_KEEP_MODEL_CHECK"  # "1": keep the model-check process for this process's next run


def warm_model_process(
    checkpoint: str, config: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None
) -> None:
    """Start the model process now (when none was kept), import torch and timm there and load this model,
    for a question that comes soon: the report's attention maps, asked once scoring is over; the ~5 s of
    its start then overlap the run's finalizing and the report's other sections. `release_model_process`
    lets it go if no question comes."""
    _ASKING.submit(_ask, ("warm", checkpoint, dict(config), dict(storage_options or {})), keep=True)


def release_model_process() -> None:
    """Let a model process kept for the report go (it exits when its stdin closes), unless
    FIQA_KEEP_MODEL_CHECK keeps it; after any question already asked (one at a time, in order)."""
    _ASKING.submit(_release)


def _release() -> None:
    if _CHECKER and os.environ.get(KEEP_CHECKER_ENV) != "1":
        checker = _CHECKER.pop()
        if checker.process.stdin is not None:
            checker.process.stdin.close()
        _reap(checker.process)


def _warm(checkpoint: str, config: Mapping[str, Any], storage_options: Mapping[str, Any]) -> bool:
    try:
        _model_for(checkpoint, config, storage_options)
    except Exception:  # the question, when it comes, loads it again and says what is wrong
        return False
    return True


def _ask(request: tuple[Any, ...], keep: bool = False) -> Any:
    keep = keep or os.environ.get(KEEP_CHECKER_ENV) == "1"
    if _CHECKER and _CHECKER[0].process.poll() is not None:
        _CHECKER.clear()  # it died (killed, out of memory): a new one
    if not _CHECKER:
        _CHECKER.append(_CheckerProcess())
    try:
        return _CHECKER[0].ask((keep, *request))
    except ModelCheckDied:
        _CHECKER.clear()
        raise
    finally:
        if not keep and _CHECKER:
            # It exits after its answer, which is not held while it does: a process with torch and a model
            # in memory takes about a second to exit, and the report waited for it (docs/benchmarks.md). It is
            # reaped next on this thread, before any other question.
            process = _CHECKER.pop().process
            try:
                _ASKING.submit(_reap, process)
            except RuntimeError:  # the interpreter is exiting: no new work for the thread
                _reap(process)


def _reap(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:  # stuck on its way out: it answers no one any more
        process.kill()
        process.wait()


def _send(stream: Any, value: Any) -> None:
    data = pickle.dumps(value)
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def _receive(stream: Any) -> Any:
    header = stream.read(8)
    size = int.from_bytes(header, "big")
    data = stream.read(size) if len(header) == 8 else b""
    if len(header) < 8 or len(data) < size:
        raise EOFError("the other side closed the pipe")
    return pickle.loads(data)


_JOBS = {"check": check_model, "attention": attention_maps, "warm": _warm}  # what the model process answers


def _serve() -> None:
    """The model-check process: answer requests (keep, job, its arguments: `_JOBS`) until one says not to keep
    it, or stdin closes. Its stdout carries only the answers (anything printed goes to stderr)."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = sys.stdin.buffer
    while True:
        try:
            request = _receive(requests)
        except EOFError:
            return
        keep, job, *arguments = request
        try:
            answer: tuple[bool, Any] = (True, _JOBS[job](*arguments))
        except Exception as error:
            answer = (False, error)
        try:
            _send(answers, answer)
        except (pickle.PicklingError, TypeError, AttributeError):  # an error that does not pickle
            _send(answers, (False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
        if not keep:
            return


def resolve_model(options: ScoreOptions, started: ModelCheck | None = None) -> tuple[ModelFacts, str]:
    """(the model's facts, its checkpoint URL): the model checked once before any work (in a child
    process: `ModelCheck`, the one `started` early when given), so that a bad checkpoint or config fails
    here."""
    check = started or ModelCheck(options)
    return check.result(), check.checkpoint


def scoring_config(loaded: Any, options: ScoreOptions) -> dict[str, Any]:
    """What the numbers depend on: the fingerprint of this decides whether results may be mixed.
    `loaded`: the model's `ModelFacts` (or a `LoadedModel`: anything with its `config` and `sha256`).
    `options.device` must be resolved ("cpu" or "cuda"; `flows.cluster.scoring_device`): it decides "auto"
    precision."""
    exit_depth, fusion, weights = check_options_against(loaded.config, options)
    if options.precision == "auto" and options.device not in ("cpu", "cuda"):
        raise ValueError(
            "resolve the device (scoring_device) before the configuration: auto precision depends on it"
        )
    precision = (
        ("bf16" if options.device == "cuda" else "fp32") if options.precision == "auto" else options.precision
    )
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


def check_options_against(config: ViTFIQAConfig, options: ScoreOptions) -> tuple[int, Fusion, np.ndarray]:
    """(exit depth, fusion, its weights) of `options` for a model of this architecture; UserError for options
    the model cannot take (an exit past its last block, a fusion weight count that is not the depth)."""
    exit_depth = options.exit_depth or config.depth
    if not 1 <= exit_depth <= config.depth:
        raise UserError(f"--exit-depth must be in 1..{config.depth}, got {exit_depth}")
    if options.embeddings and exit_depth != config.depth:
        raise UserError(
            f"--embeddings needs the full depth ({config.depth}): the embedding is the output "
            f"of the whole model, and exit depth {exit_depth} stops before it"
        )
    if options.decode == "device" and options.align:
        raise UserError(
            "--decode device is for aligned crops; with --align photos are decoded where faces are found"
        )
    fusion = parse_fusion(options.fusion)
    return exit_depth, fusion, fusion.weights(exit_depth)  # rejects a wrong number of user weights


def _arch_option(options: ScoreOptions) -> ViTFIQAConfig | str | None:
    """The architecture as `load_model` takes it from the options: a preset (with its mode when given), a
    preset's name or a JSON config's path, or None (the weights and a `config.json` beside them tell)."""
    if options.mode and not options.arch:
        raise UserError("--mode goes with --arch (a preset); a JSON config states its own mode")
    if options.arch:
        return ViTFIQAConfig.preset(options.arch, mode=options.mode) if options.mode else options.arch
    return options.architecture_file


def check_before_start(options: ScoreOptions) -> None:
    """What can be checked of the model options in a blink, before the run starts Prefect's server, Ray and
    the model check (seconds each): the checkpoint and the model config exist, and, when the architecture is
    declared (a preset, a JSON config, the `config.json` beside a local checkpoint), the options fit it.
    The model check (`ModelCheck`) still loads the weights and checks them against the declaration."""
    checkpoint = options.checkpoint or str(BUNDLED_CHECKPOINT)
    # on local disks only: remote stores may say "not found" for an outage or a refusal (fsspec's HTTP does),
    # and the model check reads the checkpoint anyway and tells the whole story
    path = local_path(checkpoint)
    if path is not None and not path.exists():
        raise UserError(f"checkpoint not found: {checkpoint}")
    declared = declared_architecture(options, checkpoint)
    if declared is not None:
        check_options_against(declared, options)


def declared_architecture(options: ScoreOptions, checkpoint: str) -> ViTFIQAConfig | None:
    """The architecture the options or the checkpoint's folder declare, read without torch; None when only
    the weights tell (a checkpoint alone), or when a declared depth is left to the weights."""
    arch = _arch_option(options)
    if isinstance(arch, ViTFIQAConfig):
        return arch
    if arch in PRESETS:  # `--arch vit_s_qs`, or `--model-config vit_s_qs` as `load_model` takes it too
        return ViTFIQAConfig.preset(arch)
    path = arch if arch is not None else find_sidecar_config(checkpoint)
    if path is None:
        return None
    if not Path(path).is_file():
        raise UserError(f"no such model config or preset: {path} (presets: {', '.join(sorted(PRESETS))})")
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        return ViTFIQAConfig.from_dict(values) if isinstance(values, dict) and "depth" in values else None
    except (ValueError, TypeError):
        return None  # the model check says what is wrong with it


if __name__ == "__main__":
    # through the module's importable name, so that the answers pickle as
    # fiqa_curator.flows.configuration.ModelFacts, not __main__.ModelFacts
    from fiqa_curator.flows.configuration import _serve as serve

    serve()
