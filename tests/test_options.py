"""The scoring options are declared once (flows.options.ScoreOptions): the `fiqa score` and `fiqa serve`
flags and the nightly flow's `scoring` parameter are derived from them and cannot drift."""

from __future__ import annotations

import argparse

import pytest

from fiqa_curator.flows.cli import build_parser
from fiqa_curator.flows.options import (
    DEFAULT_SHARD_SIZE,
    NightlyScoring,
    ScoreOptions,
    flag_of,
    options_from_args,
    serve_parameters,
)
from fiqa_curator.schemas.errors import UserError


def _flags(command: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {option: action for action in sub._actions for option in action.option_strings}


def test_every_option_is_a_score_flag_with_its_help_text() -> None:
    flags = _flags("score")
    for name, field in ScoreOptions.model_fields.items():
        if name in ("input", "output"):
            continue
        if name == "align":
            assert {"--align", "--all-faces"} <= set(flags)
            continue
        action = flags[flag_of(name)]
        assert field.description and field.description in action.help, name
    assert {"--no-report", "--model-config", "--stall-timeout", "--no-progress"} <= set(flags)


def test_serve_flags_and_nightly_parameters_are_the_same_fields_with_the_same_defaults() -> None:
    serve = _flags("serve")
    for name, field in NightlyScoring.model_fields.items():
        source = ScoreOptions.model_fields[name]
        assert field.default == source.default and field.description == source.description, name
        assert field.annotation == source.annotation, name
        if name != "align":
            assert flag_of(name) in serve, name
    assert {"shard_size", "exit_depth", "device", "workers", "precision", "decode", "align"} <= set(
        NightlyScoring.model_fields
    )
    assert (
        "since" not in NightlyScoring.model_fields and "--since" not in serve
    )  # set by the nightly flow itself
    assert NightlyScoring().shard_size == DEFAULT_SHARD_SIZE
    with pytest.raises(ValueError):
        NightlyScoring(batch_size=0)  # bounds come along too


def test_a_command_line_becomes_options() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "score",
            "in/",
            "out/",
            "--model-config",
            "m.json",
            "--exit-depth",
            "6",
            "--align",
            "--all-faces",
            "--stall-timeout",
            "0",
            "--storage-options",
            '{"anon": true}',
            "--no-report",
            "--workers",
            "2",
        ]
    )
    options = options_from_args(args)
    assert options.architecture_file == "m.json" and options.exit_depth == 6 and options.workers == 2
    assert options.align == "all" and options.stall_timeout is None and options.report is False
    assert options.storage_options == {"anon": True} and options.shard_size == DEFAULT_SHARD_SIZE
    assert options_from_args(parser.parse_args(["score", "a", "b", "--align"])).align == "largest"
    assert options_from_args(parser.parse_args(["score", "a", "b"])).align is None
    assert (
        ScoreOptions(input="a", output="b", model_config="c.json").architecture_file == "c.json"
    )  # Python API


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
        (["--shard-size", "0"], "--shard-size"),
        (["--gpus-per-worker", "0"], "--gpus-per-worker"),
        (["--storage-options", "[1]"], "--storage-options must be a JSON object"),
        (["--storage-options", "{nope"], "--storage-options is not JSON"),
    ],
)
def test_bad_values_are_user_errors_that_name_their_flag(argv: list[str], message: str) -> None:
    args = build_parser().parse_args(["score", "in/", "out/", *argv])
    with pytest.raises(UserError, match=message):
        options_from_args(args)


def test_serve_passes_on_only_the_flags_given() -> None:
    parser = build_parser()
    given = serve_parameters(parser.parse_args(["serve", "in/", "root/", "--exit-depth", "6", "--all-faces"]))
    assert given == {"exit_depth": 6, "align": "all"}
    assert serve_parameters(parser.parse_args(["serve", "in/", "root/"])) == {}
    assert NightlyScoring.model_validate(given).exit_depth == 6
    with pytest.raises(UserError, match="--batch-size"):  # refused when served, not at the first night's run
        serve_parameters(parser.parse_args(["serve", "in/", "root/", "--batch-size", "0"]))


def _refuse_to_start(*args: object, **kwargs: object) -> None:
    raise AssertionError("started before the options were checked")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"input": "{tmp}/absent"}, "INPUT does not exist"),
        ({"checkpoint": "{tmp}/nope.pt", "arch": "vit_s_qs"}, "checkpoint not found"),
        ({"architecture_file": "{tmp}/none.json"}, "no such model config"),
        ({"output": "/proc/fiqa-cannot-write-here"}, "OUTPUT is not writable"),
        ({"exit_depth": 13}, r"--exit-depth must be in 1\.\.12"),  # the bundled model's config.json
        ({"arch": "vit_s_qs", "exit_depth": 13}, r"--exit-depth must be in 1\.\.12"),  # a preset's depth
        ({"fusion": "1,2"}, "2 fusion weights given for 12 exits"),
        ({"mode": "crfiqa"}, "--mode goes with --arch"),
    ],
)
def test_options_a_run_cannot_take_fail_before_prefect_ray_and_the_model_check_start(
    tmp_path, monkeypatch, given: dict[str, object], message: str
) -> None:
    import fiqa_curator.flows.prefect_server as prefect_server
    import fiqa_curator.flows.score as score

    (tmp_path / "in").mkdir()
    monkeypatch.setattr(prefect_server, "start_prefect_api_in_background", _refuse_to_start)
    monkeypatch.setattr(score, "ModelCheck", _refuse_to_start)
    monkeypatch.setattr(score, "start_ray", _refuse_to_start)
    values = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}
    values.update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in given.items()})
    with pytest.raises(UserError, match=message):
        score.score_flow(ScoreOptions(**values))


def test_a_checkpoint_without_a_declared_architecture_is_left_to_the_model_check(tmp_path) -> None:
    from fiqa_curator.flows.configuration import check_before_start, declared_architecture

    (tmp_path / "model.pt").write_bytes(b"weights")  # no config.json beside it: only the weights tell
    options = ScoreOptions(input="in", output="out", checkpoint=str(tmp_path / "model.pt"), exit_depth=40)
    assert declared_architecture(options, options.checkpoint) is None
    check_before_start(options)  # the depth is unknown here: the model check judges --exit-depth 40
    (tmp_path / "config.json").write_text('{"depth": 6, "embed_dim": 64, "num_heads": 4}')
    assert declared_architecture(options, options.checkpoint).depth == 6
    with pytest.raises(UserError, match=r"--exit-depth must be in 1\.\.6, got 40"):
        check_before_start(options)
