"""The nightly job: a Prefect deployment of the scoring flow on a cron schedule.

`nightly_score` scores INPUT into OUTPUT_ROOT/<date>/ (the date of the run's scheduled start, in the
schedule's time zone), incrementally from the latest earlier dated folder that finished (`--since`), and
writes the report; the deployment runs it on a cron schedule with retries and a concurrency limit of
one, so two runs never write the same folder at once (a second trigger waits, or is cancelled: as
configured). `fiqa serve` serves it against the configured Prefect server; `prefect.yaml` at the
repository root declares the same deployment for a work pool. When the latest earlier night was scored
with another configuration (a new model, exit depth, precision, ...), its rows cannot be carried over:
the night scores everything, with a warning, instead of failing every night until someone comes.

The scoring options a deployment sets are one parameter, `scoring` (`flows.options.NightlyScoring`:
ScoreOptions' fields that `fiqa serve` has, with the same defaults and help texts).

Credentials are never parameters (Prefect stores parameters): object stores are reached with the
standard environment variables of the process that runs the flow (AWS_* for s3://).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger

from fiqa_curator.flows.incremental import IncrementalError
from fiqa_curator.flows.options import NightlyScoring, ScoreOptions
from fiqa_curator.flows.score import score_flow
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import SUCCESS_FILE

DEPLOYMENT_NAME = "nightly"
DEFAULT_CRON = "0 2 * * *"
_DATED = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def run_date(timezone: str, scheduled: datetime | None = None) -> date:
    """The day a run belongs to: its scheduled start (else now) in the schedule's time zone."""
    moment = scheduled or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(ZoneInfo(timezone)).date()


def previous_output(output_root: str, today: date) -> str | None:
    """The latest dated folder before `today` under OUTPUT_ROOT that finished (has _SUCCESS)."""
    root = Output(output_root)
    earlier = sorted(
        (name for name in root.list_dirs() if _DATED.match(name) and name < today.isoformat()), reverse=True
    )
    for name in earlier:
        if root.read_bytes(f"{name}/{SUCCESS_FILE}") is not None:
            return root.full_url(name)
    return None


@flow(name="fiqa-nightly", retries=2, retry_delay_seconds=600, log_prints=False)
def nightly_score(
    input: str,
    output_root: str,
    scoring: NightlyScoring | None = None,
    incremental: bool = True,
    timezone: str = "UTC",
    run_for: str | None = None,
) -> dict[str, Any]:
    """Score INPUT into OUTPUT_ROOT/<date>/ (incrementally from the latest finished earlier date), with the
    `scoring` options (`fiqa score`'s; `architecture_file` is its --model-config). `run_for` (YYYY-MM-DD)
    overrides the date, for a manual catch-up run."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    scheduled = flow_run.scheduled_start_time
    today = date.fromisoformat(run_for) if run_for else run_date(timezone, scheduled)
    output = Output(output_root).full_url(today.isoformat())
    since = previous_output(output_root, today) if incremental else None
    logger.info("nightly run for %s: %s -> %s%s", today, input, output, f" (since {since})" if since else "")
    chosen = NightlyScoring.model_validate(scoring or {})
    options = ScoreOptions.make(
        input=input, output=output, since=since, **chosen.model_dump(exclude_unset=True)
    )
    try:
        summary = score_flow(options)
    except IncrementalError as error:  # raised after planning, before any scoring: nothing to undo
        logger.warning("%s; scoring every image tonight instead", error)
        summary = score_flow(options.model_copy(update={"since": None}))
    return {
        "output": summary.output,
        "report": summary.report,
        "rows": summary.total_rows,
        "scored_now": summary.scored_now,
        "carried_over": summary.carried_over,
        "counts": summary.counts,
    }


def nightly_deployment(
    input: str,
    output_root: str,
    *,
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    name: str = DEPLOYMENT_NAME,
    collision: str = "enqueue",
    parameters: dict[str, Any] | None = None,
) -> Any:
    """The deployment object (`RunnerDeployment`): schedule, parameters, one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    ZoneInfo(timezone)  # an unknown time zone fails here, not at 2 a.m.
    strategy = {
        "enqueue": ConcurrencyLimitStrategy.ENQUEUE,
        "cancel-new": ConcurrencyLimitStrategy.CANCEL_NEW,
    }
    if collision not in strategy:
        raise UserError(f"collision must be one of {', '.join(strategy)}, got {collision!r}")
    return nightly_score.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"input": input, "output_root": output_root, "timezone": timezone, **(parameters or {})},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy[collision]),
        tags=["fiqa"],
        description=f"fiqa-curator nightly scoring of {input} into {output_root}/<date>/",
    )
