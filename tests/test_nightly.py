"""The nightly deployment: dates and incremental chaining, and a real deployment served by `fiqa serve`
against a temporary Prefect server, triggered twice while busy (the second waits: concurrency limit 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiqa_curator.flows.nightly import nightly_deployment, previous_output, run_date

FIQA = str(Path(sys.executable).parent / "fiqa")


def test_run_date_is_the_scheduled_day_in_the_schedule_time_zone() -> None:
    assert run_date("Europe/Berlin", datetime(2026, 11, 29, 23, 30, tzinfo=UTC)) == date(2026, 11, 30)
    assert run_date("UTC", datetime(2026, 11, 29, 23, 30, tzinfo=UTC)) == date(2026, 11, 29)
    assert run_date("America/New_York", datetime(2026, 11, 30, 3, 0, tzinfo=UTC)) == date(2026, 11, 29)


def test_previous_output_is_the_latest_finished_earlier_day(tmp_path: Path) -> None:
    for name, finished in (
        ("2026-11-27", True),
        ("2026-11-28", True),
        ("2026-11-29", False),
        ("2026-11-30", True),
        ("notes", True),
    ):
        (tmp_path / name).mkdir()
        if finished:
            (tmp_path / name / "_SUCCESS").write_bytes(b"")
    assert previous_output(str(tmp_path), date(2026, 11, 30)).endswith("/2026-11-28")  # 29 never finished
    assert previous_output(str(tmp_path), date(2026, 11, 28)).endswith("/2026-11-27")
    assert previous_output(str(tmp_path), date(2026, 11, 27)) is None
    assert previous_output(str(tmp_path / "absent"), date(2026, 11, 27)) is None


def test_deployment_declares_schedule_parameters_and_one_run_at_a_time() -> None:
    deployment = nightly_deployment(
        "s3://b/faces",
        "s3://b/quality",
        cron="30 1 * * *",
        timezone="Europe/Berlin",
        parameters={"scoring": {"exit_depth": 6}},
    )
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == "30 1 * * *" and schedule.timezone == "Europe/Berlin"
    assert deployment.parameters == {
        "input": "s3://b/faces",
        "output_root": "s3://b/quality",
        "timezone": "Europe/Berlin",
        "scoring": {"exit_depth": 6},
    }
    assert deployment.concurrency_limit == 1
    assert str(deployment.concurrency_options.collision_strategy.value) == "ENQUEUE"
    with pytest.raises(Exception, match=r"Nowhere|time zone"):
        nightly_deployment("a", "b", timezone="Nowhere/Special")


@pytest.mark.slow
def test_served_deployment_runs_and_a_second_trigger_waits(tmp_path: Path, prefect_harness) -> None:
    import prefect
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(folder / f"img_{index}.png")
    api = prefect.settings.PREFECT_API_URL.value()
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server = subprocess.Popen(
        [
            FIQA,
            "serve",
            str(folder),
            str(tmp_path / "quality"),
            "--name",
            "test-nightly",
            "--timezone",
            "Europe/Berlin",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None and time.monotonic() < deadline:
            try:
                with get_client(sync_client=True) as client:
                    deployment = client.read_deployment_by_name("fiqa-nightly/test-nightly")
            except Exception:
                time.sleep(1)
        assert deployment is not None, "fiqa serve did not register the deployment"
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
        assert deployment.schedules[0].schedule.timezone == "Europe/Berlin"

        first = run_deployment("fiqa-nightly/test-nightly", parameters={"run_for": "2026-11-30"}, timeout=0)
        second = run_deployment("fiqa-nightly/test-nightly", parameters={"run_for": "2026-11-30"}, timeout=0)
        runs = {}
        deadline = (
            time.monotonic() + 900
        )  # a hang guard (~70 s idle; the waiting run polls for its slot every 30 s)
        while time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                runs = {
                    name: client.read_flow_run(run.id) for name, run in (("first", first), ("second", second))
                }
            if all(run.state.is_final() for run in runs.values()):
                break
            # a failed attempt would wait 10 minutes for its retry: report its failure now instead
            assert not any(run.state.name == "AwaitingRetry" for run in runs.values()), {
                name: (run.state.name, run.state.message) for name, run in runs.items()
            }
            time.sleep(0.5)
        assert all(run.state.is_completed() for run in runs.values()), {n: r.state for n, r in runs.items()}
        # one run at a time: whichever the runner took first, the other waited for its slot and started only
        # after the first had finished (without the limit the runner starts both at once)
        early, late = sorted(runs.values(), key=lambda run: run.start_time)
        assert early.end_time <= late.start_time
        out = tmp_path / "quality" / "2026-11-30"
        assert (out / "_SUCCESS").is_file() and len(list((out / "scores").glob("*.parquet"))) == 1
        assert (out / "report" / "index.html").is_file()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
