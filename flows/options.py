"""The scoring options, declared once: `ScoreOptions` is everything `fiqa score` can be told.

Each field carries its type, default, bounds and help text; the `fiqa score` and `fiqa serve` flags
(`add_score_arguments`, `add_serve_arguments`) and the nightly flow's `scoring` parameter
(`NightlyScoring`, which Prefect shows with the same help texts) are derived from it, so none of them can
drift. Values are checked when an options object is made: a bad one is a `UserError` naming its flag.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from fiqa_curator.schemas.errors import UserError
from fiqa_curator.workers.settings import DEFAULT_MAX_PIXELS, AlignMode

# `--memory-limit`'s default for the DuckDB commands (`flows.table_sql`), here so that building the CLI's
# parser does not import DuckDB
DEFAULT_MEMORY_SHARE = 0.25  # of this machine's memory: DuckDB's own default (80%) leaves too little
DEFAULT_SHARD_SIZE = 1000
RAW_PHOTOS = "raw photos (default: INPUT holds aligned 112x112 face crops)"
DEFAULT_STALL_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line: its flag, its help group, whether `fiqa serve` has it too,
    and, for a field whose flag is not its name, the flag's spelling."""

    group: str
    serve: bool = False
    flag: str | None = None  # default: --field-name
    metavar: str | None = None
    exclusive: str | None = None  # flags of one exclusive group


def _flag(group: str, **kwargs: Any) -> dict[str, Any]:
    return {"cli": Flag(group, **kwargs)}


class ScoreOptions(BaseModel):
    """What `fiqa score` can be told; `flows.score.score_flow(options)` runs it. The architecture file
    (`--model-config`) is the field `architecture_file`, which also takes the name `model_config` when an
    options object is made (pydantic keeps `options.model_config` for its own settings)."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, protected_namespaces=(), validate_assignment=False
    )

    input: str = Field(description="folder/prefix, .csv/.parquet manifest, or .tar shard (any fsspec URL)")
    output: str = Field(description="output folder (any fsspec URL)")
    # model
    checkpoint: str | None = Field(
        None,
        description="model.pt, local path or URL (default: the bundled model)",
        json_schema_extra=_flag("model", serve=True),
    )
    architecture_file: str | None = Field(
        None,
        alias="model_config",
        description="JSON architecture config (keys of the official fixture config.json)",
        json_schema_extra=_flag(
            "model", serve=True, flag="--model-config", metavar="FILE", exclusive="architecture"
        ),
    )
    arch: Literal["vit_s_qs", "vit_b_qs"] | None = Field(
        None,
        description="architecture preset",
        json_schema_extra=_flag("model", serve=True, exclusive="architecture"),
    )
    mode: Literal["token", "crfiqa", "full"] | None = Field(
        None, description="with --arch: the expected mode", json_schema_extra=_flag("model")
    )
    exit_depth: int | None = Field(
        None,
        ge=1,
        description="run blocks 1..L only (default: the model depth)",
        json_schema_extra=_flag("model", serve=True),
    )
    fusion: str = Field(
        "fw",
        description="fw | f | final | w1,...,wL: the fusion in the `quality` column",
        json_schema_extra=_flag("model", serve=True),
    )
    embeddings: bool = Field(
        False,
        description="also store the model's face embedding (full depth only), for `fiqa evaluate`",
        json_schema_extra=_flag("model"),
    )
    # raw photos
    align: AlignMode | None = Field(
        None,
        description="raw photographs: detect faces (dlib) and warp the largest (largest) or every one (all) "
        "to the ArcFace template; no face: status no_face",
        json_schema_extra=_flag(RAW_PHOTOS, serve=True),
    )
    # execution
    batch_size: int | None = Field(
        None,
        ge=1,
        description="images per model batch (default: 64 on CPU; on GPU the largest that fits the free "
        "memory, measured by each actor, at most 2048, in Ray blocks of 1024)",
        json_schema_extra=_flag("execution", serve=True),
    )
    shard_size: int = Field(
        DEFAULT_SHARD_SIZE,
        ge=1,
        description="images per output file",
        json_schema_extra=_flag("execution", serve=True),
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="scoring actors (default: one per GPU, else 1); on a cluster "
        "that adds GPU nodes on demand, with --device cuda",
        json_schema_extra=_flag("execution", serve=True),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the actors score", json_schema_extra=_flag("execution", serve=True)
    )
    gpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="GPUs per scoring actor; 0.5 puts two actors on each GPU",
        json_schema_extra=_flag("execution", serve=True),
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="model arithmetic: auto = bf16 autocast on GPU, fp32 on CPU; part of the configuration, "
        "so a run resumes and --since carries over only the same precision",
        json_schema_extra=_flag("execution", serve=True),
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu",
        description="where plain JPEG crops are decoded: cpu (reading tasks, Pillow) or device (the scoring "
        "actor: nvJPEG on GPU, batched; other images stay on the CPU)",
        json_schema_extra=_flag("execution", serve=True),
    )
    ray_address: str | None = Field(
        None,
        description="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)",
        json_schema_extra=_flag("execution"),
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="refuse larger images", json_schema_extra=_flag("execution")
    )
    overwrite: bool = Field(
        False,
        description="replace results of a different plan in OUTPUT",
        json_schema_extra=_flag("execution"),
    )
    stall_timeout: float | None = Field(
        DEFAULT_STALL_TIMEOUT_S,
        ge=0,
        description="fail the run when no batch is scored for this long, instead of "
        "waiting forever on a cluster that lost resources (0: wait)",
        json_schema_extra=_flag("execution", metavar="SECONDS"),
    )
    since: str | None = Field(
        None,
        description="incremental: copy the rows of images unchanged since "
        "PREVIOUS_OUTPUT (same id, URI, size, ETag/mtime; same configuration) and score only new "
        "or changed ones",
        json_schema_extra=_flag("execution", metavar="PREVIOUS_OUTPUT"),
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options as JSON, e.g. '{\"anon\": false}'",
        json_schema_extra=_flag("execution"),
    )
    report: bool = Field(
        True,
        description="write OUTPUT/report/index.html at the end",
        json_schema_extra=_flag("execution", flag="--no-report"),
    )

    @field_validator("input", "output", "checkpoint", "architecture_file", "since", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return (
            os.fspath(value) if isinstance(value, os.PathLike) else value
        )  # pathlib.Path from Python callers

    @field_validator("stall_timeout")
    @classmethod
    def _zero_waits(cls, value: float | None) -> float | None:
        return value or None  # 0 means: wait as long as it takes

    @field_validator("storage_options", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        return parse_storage_options(value) if isinstance(value, str) else value

    @classmethod
    def make(cls, **values: Any) -> ScoreOptions:
        """`ScoreOptions(**values)`, with a bad value reported as a UserError that names its flag."""
        if isinstance(values.get("storage_options"), str):  # its own messages, not pydantic's wording of them
            values = {**values, "storage_options": parse_storage_options(values["storage_options"])}
        try:
            return cls(**values)
        except ValidationError as error:
            raise UserError(_problems(error)) from None


def _problems(error: ValidationError) -> str:
    """A validation error as one line, each problem named by its flag."""
    problems = []
    for issue in error.errors():
        name = str(issue["loc"][0]) if issue["loc"] else ""
        problems.append(f"{flag_of(name)}: {issue['msg']}" if name else issue["msg"])
    return "; ".join(problems)


def flag_of(name: str) -> str:
    """The command-line flag of field `name` or of its alias (INPUT, OUTPUT for the positional ones)."""
    key = next((k for k, f in ScoreOptions.model_fields.items() if f.alias == name), name)
    field = ScoreOptions.model_fields.get(key)
    meta = _meta(field) if field is not None else None
    if meta is None:
        return name.upper() if name in ("input", "output") else name
    return meta.flag or "--" + key.replace("_", "-")


def _meta(field: Any) -> Flag | None:
    extra = field.json_schema_extra or {}
    return extra.get("cli") if isinstance(extra, dict) else None


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options` JSON -> dict (empty when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UserError(f"--storage-options is not JSON: {error}") from error
    if not isinstance(value, dict):
        raise UserError("--storage-options must be a JSON object")
    return value


def _choices(annotation: Any) -> list[str] | None:
    """The values of a Literal (optionally `| None`) annotation."""
    args = (
        [a for a in typing.get_args(annotation) if a is not type(None)]
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
        else [annotation]
    )
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return [str(v) for v in typing.get_args(args[0])]
    return None


def _scalar_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if args[0] in (int, float) else str


def _add(
    parser: argparse.ArgumentParser, groups: dict[str, Any], name: str, field: Any, *, serve: bool
) -> None:
    meta = _meta(field)
    assert meta is not None
    if meta.group not in groups:  # `fiqa serve` lists its few flags without groups
        groups[meta.group] = parser if serve else parser.add_argument_group(meta.group)
    target = groups[meta.group]
    if meta.exclusive:
        if meta.exclusive not in groups:
            groups[meta.exclusive] = target.add_mutually_exclusive_group()
        target = groups[meta.exclusive]
    help_text = field.description
    if name == "align":  # one field, two flags: --align (the largest face), --all-faces (every face)
        default = argparse.SUPPRESS if serve else False
        target.add_argument(
            "--align",
            action="store_true",
            default=default,
            help="detect faces (dlib) and warp the largest to the ArcFace template; no face: status no_face",
        )
        target.add_argument(
            "--all-faces",
            action="store_true",
            default=default,
            help="with --align: one row per face (image ids ID#face0, ID#face1, ...; largest first)",
        )
        return
    flag = meta.flag or "--" + name.replace("_", "-")
    default = argparse.SUPPRESS if serve else field.default
    if field.annotation is bool:
        if flag.startswith("--no-"):
            target.add_argument(
                flag, dest=name, action="store_false", default=default, help=f"do not {help_text}"
            )
        else:
            target.add_argument(flag, dest=name, action="store_true", default=default, help=help_text)
        return
    choices = _choices(field.annotation)
    if name == "storage_options":
        target.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)
        return
    shown = f" (default: {field.default})" if field.default is not None else ""
    target.add_argument(
        flag,
        dest=name,
        type=None if choices else _scalar_type(field.annotation),
        choices=choices,
        default=default,
        metavar=meta.metavar,
        help=(help_text or "") + shown,
    )


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ScoreOptions field as a `fiqa score` argument (INPUT and OUTPUT positional)."""
    for name in ("input", "output"):
        parser.add_argument(name, metavar=name.upper(), help=ScoreOptions.model_fields[name].description)
    groups: dict[Any, Any] = {}
    for name, field in ScoreOptions.model_fields.items():
        if name not in ("input", "output"):
            _add(parser, groups, name, field, serve=False)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The fields a nightly deployment may set, as `fiqa serve` flags; only those given become parameters."""
    groups: dict[Any, Any] = {}
    for name, field in ScoreOptions.model_fields.items():
        meta = _meta(field)
        if meta is not None and meta.serve:
            _add(parser, groups, name, field, serve=True)


def _given(args: argparse.Namespace, names: Any) -> dict[str, Any]:
    values = {name: getattr(args, name) for name in names if name != "align" and hasattr(args, name)}
    if hasattr(args, "align") or hasattr(args, "all_faces"):
        values["align"] = (
            "all"
            if getattr(args, "all_faces", False)
            else "largest"
            if getattr(args, "align", False)
            else None
        )
    return values


def options_from_args(args: argparse.Namespace) -> ScoreOptions:
    """The options of a parsed `fiqa score` command line."""
    return ScoreOptions.make(**_given(args, ScoreOptions.model_fields))


def serve_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The `fiqa serve` flags that were given, as the nightly flow's `scoring` parameter (checked: a bad
    value is a UserError naming its flag, at `fiqa serve` time rather than at the first night's run)."""
    given = _given(args, NightlyScoring.model_fields)
    try:
        NightlyScoring.model_validate(given)
    except ValidationError as error:
        raise UserError(_problems(error)) from None
    return given


def _serve_fields() -> dict[str, Any]:
    """ScoreOptions' `fiqa serve` fields with their types, bounds (the field's metadata), defaults and help
    texts; not their command-line metadata, which is no JSON schema for Prefect."""
    fields = {}
    for name, field in ScoreOptions.model_fields.items():
        meta = _meta(field)
        if meta is not None and meta.serve:
            annotation = (
                Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            )
            fields[name] = (annotation, Field(field.default, description=field.description))
    return fields


# The nightly flow's `scoring` parameter: the options a deployment sets, with ScoreOptions' types, defaults,
# bounds and help texts (Prefect shows them in its UI).
NightlyScoring = create_model(
    "NightlyScoring", __config__=ConfigDict(extra="forbid", protected_namespaces=()), **_serve_fields()
)
