"""OUTPUT's layout, declared once: every file `fiqa score` writes, and the commands after it read.

    OUTPUT/
      _plan.json                  the plan: fingerprints, shard size, scoring configuration
      _plan/listing.parquet       the exact listing the shards refer to
      scores/shard-00000.parquet  the quality table, one file per shard, each appearing only when complete
      _staging/                   partial writes: never read, cleaned by the next run
      _run.json                   the run record (`RunRecord`), written after the last shard
      _SUCCESS                    written last: the table is complete
      report/                     index.html and summary.json (`fiqa report`, the end of `fiqa score`)
      evaluation/                 `fiqa evaluate --output OUTPUT/evaluation`, shown by the report
      curation/                   `fiqa select`: keep.parquet, drop.parquet, selection.json;
                                  `fiqa identities`: identity_images.parquet, identities.parquet,
                                  identities.json (schemas.identities)

Paths are relative to OUTPUT and '/'-separated (OUTPUT may be any fsspec URL). `flows.storage.Output`
reads and writes them; `RunRecord` is the run record's one definition, for the writer and every reader.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fiqa_curator.schemas.errors import UserError

SCORES = "scores"
PLAN_FILE = "_plan.json"
LISTING_FILE = "_plan/listing.parquet"
TARS_FILE = "_plan/tars.parquet"  # the WebDataset shards the listing came from (flows.tar_listing)
STAGING = "_staging"
RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
REPORT_PAGE = "report/index.html"
REPORT_SUMMARY = "report/summary.json"
EVALUATION = "evaluation"
CURATION = "curation"
IDENTITY_IMAGES_FILE = f"{CURATION}/identity_images.parquet"  # per image (schemas.identities)
IDENTITIES_FILE = f"{CURATION}/identities.parquet"  # per identity
IDENTITY_SUMMARY_FILE = f"{CURATION}/identities.json"  # thresholds, how they were chosen, counts
# What a fresh plan replaces (a run of another plan, with --overwrite).
RUN_FILES = (SCORES, PLAN_FILE, LISTING_FILE, TARS_FILE, RUN_FILE, SUCCESS_FILE)


def shard_name(index: int) -> str:
    """The name of shard `index` (0-based): its file is `shard_file(shard_name(index))`."""
    return f"shard-{index:05d}"


def shard_file(shard: str) -> str:
    return f"{SCORES}/{shard}.parquet"


class StageFigures(BaseModel):
    """Where the scoring time went, and how the work was spread."""

    model_config = ConfigDict(extra="ignore")

    write_seconds: float = 0.0
    first_batch_seconds: float = 0.0  # start-up: actors spawned, model loaded, first batch through
    steady_images_per_second: float = 0.0  # the rate once running
    rows_by_node: dict[str, int] = Field(default_factory=dict)  # rows scored per Ray node
    actor_nodes: list[str] = Field(default_factory=list)  # the Ray nodes of the scoring actors
    block_rows: int | None = None
    decoded_on_device: int = 0


class RunRecord(BaseModel):
    """`_run.json`: what a run of `fiqa score` did, for people, the report and the evaluation. Written once
    per run (`to_json`), read by `from_json`, which accepts records of earlier versions (and partial ones
    written by other tools): every field has a default."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    output: str = ""
    run_id: str = ""
    counts: dict[str, int] = Field(
        default_factory=dict
    )  # rows by status over the whole table (all runs' shards)
    total_rows: int = 0
    scored_now: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: dict[str, float] = Field(default_factory=dict)  # per stage: load_model, plan, execute
    images_per_second: float = 0.0
    model_sha256: str = ""
    exit_depth: int = 0
    fusion: str = ""
    uses_demo_model: bool = False
    report: str | None = None
    carried_over: int = 0
    finished_at: str | None = None
    input: str | None = None
    input_kind: str | None = None
    shard_size: int | None = None
    shard_count: int | None = None
    config: dict[str, Any] = Field(
        default_factory=dict
    )  # the scoring configuration (its fingerprint is the plan's)
    workers: int | None = None
    device: str | None = None
    checkpoint: str | None = None
    since: str | None = None
    stages: StageFigures = Field(default_factory=StageFigures)
    versions: dict[str, str] = Field(default_factory=dict)
    # seconds since the process started at which each step finished, in order (flows.timeline)
    timeline: dict[str, float] = Field(default_factory=dict)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> RunRecord:
        """The record in `raw`; UserError when it is not one (a damaged or foreign `_run.json`)."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as error:
            raise UserError(f"{RUN_FILE} is not a fiqa run record: {error.errors()[0]['msg']}") from None

    @property
    def model_config_dict(self) -> dict[str, Any] | None:
        """The architecture the run scored with (ViTFIQAConfig.to_dict()), if recorded."""
        return self.config.get("model_config")
