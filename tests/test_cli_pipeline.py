"""`fiqa score` as a user runs it: the installed command in its own process, with its own local Ray and
Prefect's temporary server, against local folders and a real S3 server; killed and resumed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from PIL import Image

from fiqa_curator.workers import QualityScorer, ViTFIQA, ViTFIQAConfig, decode_face, load_model
from tests.conftest import TOLERANCE, read_quality_table

pytestmark = pytest.mark.slow
FIQA = str(Path(sys.executable).parent / "fiqa")


# `fiqa` as a Python process that says whether it had imported torch when scoring was over, and after its
# report: the driver must not (the model is checked, and the report's attention maps drawn, in a child
# process, and images are scored in Ray's actors; flows.configuration)
DRIVER_WITHOUT_TORCH = """
import sys
import fiqa_curator.flows.score as score
from fiqa_curator.flows.cli import main

report_task = score.report_task

def probed_report_task(*args, **kwargs):
    print("torch imported by the driver:", "torch" in sys.modules)
    try:
        return report_task(*args, **kwargs)
    finally:
        print("torch imported by the driver's report:", "torch" in sys.modules)

score.report_task = probed_report_task
sys.exit(main(sys.argv[1:]))
"""


def fiqa(
    *args: str, env: dict | None = None, timeout: float = 600, probe_torch: bool = False
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", DRIVER_WITHOUT_TORCH, *args] if probe_torch else [FIQA, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})},
    )


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def checkpoint_dir(tmp_path: Path, config: ViTFIQAConfig, seed: int = 0) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    torch.manual_seed(seed)
    torch.save(ViTFIQA(config).state_dict(), folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


@pytest.mark.s3
def test_s3_in_and_out_with_aws_environment(tmp_path: Path, s3_server, s3_bucket: str) -> None:
    model = checkpoint_dir(tmp_path, ViTFIQAConfig(embed_dim=32, depth=4, num_heads=4))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    payloads = {f"faces/person {i}/img_{i}.jpg": jpeg(i) for i in range(6)}
    for key, data in payloads.items():
        fs.pipe(f"{s3_bucket}/in/{key}", data)
    fs.pipe(f"{s3_bucket}/in/faces/broken.png", b"\x89PNG broken")
    fs.put(str(model / "model.pt"), f"{s3_bucket}/models/model.pt")
    env = {
        "AWS_ACCESS_KEY_ID": s3_server.storage_options["key"],
        "AWS_SECRET_ACCESS_KEY": s3_server.storage_options["secret"],
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = fiqa(
        "score",
        f"s3://{s3_bucket}/in/",
        f"s3://{s3_bucket}/out/run-1",
        "--checkpoint",
        f"s3://{s3_bucket}/models/model.pt",
        "--model-config",
        str(model / "config.json"),
        "--exit-depth",
        "3",
        "--shard-size",
        "4",
        "--no-progress",
        env=env,
        probe_torch=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: 7 images (decode_error 1, ok 6)" in result.stdout
    assert "torch imported by the driver: False" in result.stdout
    assert "torch imported by the driver's report: False" in result.stdout
    page = fs.cat(f"{s3_bucket}/out/run-1/report/index.html").decode()
    assert '<section id="attention">' in page  # drawn from the model on S3, loaded in the model process
    assert s3_server.storage_options["secret"] not in result.stdout + result.stderr  # never log credentials
    assert fs.exists(f"{s3_bucket}/out/run-1/_SUCCESS")
    rows = read_quality_table(f"s3://{s3_bucket}/out/run-1", s3_server.storage_options)
    assert rows["faces/broken.png"]["status"] == "decode_error"
    assert rows["faces/person 0/img_0.jpg"]["source"] == f"s3://{s3_bucket}/in/faces/person 0/img_0.jpg"
    scorer = QualityScorer(load_model(model / "model.pt"), device="cpu")
    for key, data in payloads.items():
        expected = scorer.score(decode_face(data).image[None], exit_depth=3).exit_scores[0]
        np.testing.assert_allclose(rows[key]["exit_scores"], expected, **TOLERANCE)
    run = json.loads(fs.cat(f"{s3_bucket}/out/run-1/_run.json"))
    assert run["counts"] == {"decode_error": 1, "ok": 6} and run["config"]["exit_depth"] == 3
    assert s3_server.storage_options["secret"] not in json.dumps(run)


def test_job_level_errors_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg(1))
    cases = [
        (["score", str(tmp_path / "absent"), str(tmp_path / "o1")], "INPUT does not exist"),
        (
            [
                "score",
                str(tmp_path / "in"),
                str(tmp_path / "o2"),
                "--checkpoint",
                str(tmp_path / "nope.pt"),
                "--arch",
                "vit_s_qs",
            ],
            "checkpoint not found",
        ),
        (
            [
                "score",
                str(tmp_path / "in"),
                str(tmp_path / "o3"),
                "--model-config",
                str(tmp_path / "none.json"),
            ],
            "no such model config",
        ),
        (["score", str(tmp_path / "in"), "/proc/fiqa-cannot-write-here"], "OUTPUT is not writable"),
        (
            ["score", str(tmp_path / "in"), str(tmp_path / "o4"), "--exit-depth", "13"],
            "--exit-depth must be in 1..12",
        ),
        (
            ["score", str(tmp_path / "in"), str(tmp_path / "o5"), "--fusion", "1,2"],
            "2 fusion weights given for 12 exits",
        ),
    ]
    for args, message in cases:
        result = fiqa(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "error:" in result.stdout and message in result.stdout, (args, result.stdout)
        assert "Traceback" not in result.stdout


def test_killed_run_resumes_exactly_once(tmp_path: Path) -> None:
    model = checkpoint_dir(tmp_path, ViTFIQAConfig(embed_dim=96, depth=12, num_heads=4))
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(600):
        (folder / f"img_{index:04d}.jpg").write_bytes(jpeg(index))
    out = tmp_path / "out"
    args = [
        "score",
        str(folder),
        str(out),
        "--checkpoint",
        str(model / "model.pt"),
        "--batch-size",
        "10",
        "--shard-size",
        "10",
        "--no-progress",
    ]
    log = tmp_path / "first-run.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [FIQA, *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
        )
    deadline = time.monotonic() + 600  # a hang guard: the first shards come after ~30 s on an idle machine
    committed: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        committed = sorted((out / "scores").glob("*.parquet")) if (out / "scores").exists() else []
        if len(committed) >= 3:
            break
        time.sleep(0.02)
    # the precondition of a kill mid-run, reported as such (not as a resume failure) when it does not hold
    assert process.poll() is None, "the run ended before it could be killed:\n" + log.read_text()
    assert len(committed) >= 3, "no 3 shards committed in 600 s:\n" + log.read_text()
    os.killpg(process.pid, signal.SIGKILL)  # the whole process tree, mid-run
    process.wait()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "scores").glob("*.parquet")}
    assert 3 <= len(before) < 60, f"the kill should land mid-run, {len(before)} of 60 shards were committed"
    assert not (out / "_SUCCESS").exists()

    result = fiqa(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    run = json.loads((out / "_run.json").read_text())
    assert run["shards_skipped"] == len(before) and run["shards_written"] == 60 - len(before)
    assert run["total_rows"] == 600 and (out / "_SUCCESS").exists()
    # where the seconds went, from the process's start: every step, in the order they happen (Ray starts
    # while Prefect's server does: OUTPUT holds no finished run)
    steps = run["timeline"]
    assert list(steps) == [
        "process started",
        "run started",
        "ray started",
        "prefect ready",
        "flow started",
        "model checked",
        "planned",
        "pipeline built",
        "first batch",
        "scored",
        "finalized",
    ]
    assert steps["process started"] == 0 and list(steps.values()) == sorted(steps.values())
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "scores").glob("*.parquet")}
    assert {name: after[name] for name in before} == before  # committed shards were not recomputed
    rows = read_quality_table(str(out))  # raises if any image_id appears twice
    assert sorted(rows) == sorted(f"img_{index:04d}.jpg" for index in range(600))
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert not list((out / "_staging").glob("*.part"))


def test_a_local_run_starts_its_own_ray_even_when_another_cluster_runs_here(
    tmp_path: Path, ray_cluster
) -> None:
    """A bare ray.init() joins the latest cluster started on the machine (/tmp/ray/ray_current_cluster):
    `fiqa score` without --ray-address must not land its work on someone else's cluster."""
    import ray

    theirs = {node["NodeID"] for node in ray.nodes()}
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(3):
        (folder / f"img_{index}.jpg").write_bytes(jpeg(index))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(
        [FIQA, "score", str(folder), str(tmp_path / "out"), "--no-progress", "--no-report"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    nodes = set(json.loads((tmp_path / "out" / "_run.json").read_text())["stages"]["rows_by_node"])
    assert nodes and not nodes & theirs
    assert {node["NodeID"] for node in ray.nodes() if node["Alive"]} >= theirs  # and it left theirs alone


def test_log_json_writes_prefect_records_as_json_lines(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(1))
    result = fiqa("--log-json", "score", str(folder), str(tmp_path / "out"), "--no-progress", "--no-report")
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(r["name"] == "prefect.flow_runs" and "fiqa-score" in r["msg"] for r in records)
    assert all({"levelname", "created", "msg"} <= set(r) for r in records)
    assert " | INFO    | " not in result.stderr  # no plain-text Prefect lines left
    # Ray's and Ray Data's Python loggers too: no plain-text Python log record is left. Only Ray's C++ core
    # writes its own lines (glog, some with continuation lines under load), which Python logging never sees.
    python_record = re.compile(
        r"^(\d{4}-\d\d-\d\d [\d:,.]+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s"
        r"|\d\d:\d\d:\d\d\.\d+ \| |(DEBUG|INFO|WARNING|ERROR|CRITICAL):|Traceback)"
    )
    plain = [line for line in result.stderr.splitlines() if python_record.match(line)]
    assert not plain, plain
    assert any(r["name"].startswith("ray") for r in records)  # Ray Data's execution line, as JSON
    assert "done: 1 images (ok 1)" in result.stdout  # the summary for people stays on stdout
