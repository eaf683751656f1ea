"""A newcomer's first run: a fresh HOME and PREFECT_HOME, and Prefect's temporary server slower to start
than Prefect's own 20 s default (as on a fresh 2-core machine that has just installed the environment).

The slowness is made deterministic: a `sitecustomize` on PYTHONPATH delays (or kills) only the temporary
server's process, which Prefect marks with PREFECT__SERVER_EPHEMERAL=1. Before flows.prefect_server, the
first test failed with "Timed out while attempting to connect to ephemeral Prefect API server".
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiqa_curator.flows.prefect_server import TIMEOUT_SETTING

pytestmark = pytest.mark.slow
FIQA = str(Path(sys.executable).parent / "fiqa")
PREFECT_DEFAULT_TIMEOUT_S = 20  # Prefect's own default for TIMEOUT_SETTING
SLOW_START_S = PREFECT_DEFAULT_TIMEOUT_S + 2  # held past it whatever the server itself takes

SITECUSTOMIZE = """
import os, sys, time
if os.environ.get("PREFECT__SERVER_EPHEMERAL") == "1":  # only Prefect's temporary server process
    with open(os.environ["FIQA_TEST_SERVER_MARKER"], "a") as marker:
        marker.write(f"start {time.time()}\\n")
    if os.environ.get("FIQA_TEST_SERVER_EXIT"):
        os._exit(int(os.environ["FIQA_TEST_SERVER_EXIT"]))
    time.sleep(float(os.environ["FIQA_TEST_SERVER_DELAY"]))
"""


def _fresh_machine(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a newcomer's shell: new HOME and PREFECT_HOME, no Prefect server configured."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") and key != "RAY_ADDRESS"
    }
    return {
        **env,
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "COLUMNS": "200",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")])),
        "FIQA_TEST_SERVER_MARKER": str(tmp_path / "server-starts.txt"),
        "FIQA_TEST_SERVER_DELAY": str(SLOW_START_S),
        **extra,
    }


def _images(folder: Path, count: int) -> Path:
    folder.mkdir()
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 256, (112, 112, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        (folder / f"img_{index}.jpg").write_bytes(buffer.getvalue())
    return folder


def _score(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    folder = _images(tmp_path / "in", 3)
    return subprocess.run(
        [FIQA, "score", str(folder), str(tmp_path / "out"), "--no-progress", "--no-report"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )  # a hang guard only


def test_first_run_waits_for_a_temporary_server_slower_than_prefects_default(tmp_path: Path) -> None:
    result = _score(tmp_path, _fresh_machine(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: 3 images (ok 3)" in result.stdout
    # the server really was held past Prefect's default, and was started once: Prefect's client used ours
    # (a second start by Prefect, with its 20 s, would have failed the run)
    starts = (tmp_path / "server-starts.txt").read_text().splitlines()
    assert len(starts) == 1, starts
    assert (tmp_path / "home" / ".prefect").is_dir()  # the newcomer's own, new Prefect home


def test_a_timeout_the_user_set_wins_and_its_failure_is_one_clear_line(tmp_path: Path) -> None:
    env = _fresh_machine(tmp_path, **{TIMEOUT_SETTING: "2"})
    result = _score(tmp_path, env)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stdout
    assert (
        "did not answer within 2 s" in lines[0]
        and TIMEOUT_SETTING in lines[0]
        and "PREFECT_API_URL" in lines[0]
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out" / "scores").exists()  # nothing was planned or scored


def test_a_temporary_server_that_dies_fails_at_once_with_its_status(tmp_path: Path) -> None:
    result = _score(tmp_path, _fresh_machine(tmp_path, FIQA_TEST_SERVER_EXIT="7"))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "exited with status 7" in lines[0], result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_configured_prefect_api_is_used_as_it_is(prefect_harness) -> None:
    import prefect
    from prefect.server.api.server import SubprocessASGIServer

    from fiqa_curator.flows.prefect_server import ensure_prefect_api

    servers = dict(SubprocessASGIServer._instances)
    assert ensure_prefect_api() == prefect.settings.PREFECT_API_URL.value()  # the harness's server
    assert SubprocessASGIServer._instances == servers  # nothing new was started
