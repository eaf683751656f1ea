"""Shared test fixtures: the official reference outputs and small helpers.

The official fixtures live in `../shared/fixtures/vitfiqa` beside the repository (or FIQA_REFERENCE_FIXTURES).
Their absence is a failure, not a skip: without them the model is untested.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Ray's background threads may log after pytest has closed its capture streams; such a failed log call
# must not print a traceback over the test summary.
logging.raiseExceptions = False
# The flows run in this process check their model in one child process, kept between runs (instead of a new
# one importing torch for each of the suite's dozens of runs): flows.configuration
os.environ["FIQA_KEEP_MODEL_CHECK"] = "1"


def reference_fixture_root() -> Path:
    configured = os.environ.get("FIQA_REFERENCE_FIXTURES")
    root = Path(configured) if configured else REPO_ROOT.parent / "shared" / "fixtures" / "vitfiqa"
    if not root.is_dir():
        pytest.fail(f"official ViT-FIQA fixtures not found at {root} (set FIQA_REFERENCE_FIXTURES)")
    return root


def reference_fixture_dirs() -> list[Path]:
    configured = os.environ.get("FIQA_REFERENCE_FIXTURES")
    root = Path(configured) if configured else REPO_ROOT.parent / "shared" / "fixtures" / "vitfiqa"
    return sorted(p for p in root.glob("*") if (p / "model.pt").is_file()) if root.is_dir() else []


class ReferenceFixture:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = json.loads((path / "config.json").read_text())
        self.images = np.load(path / "images_rgb_uint8.npy")
        self.block_quality = np.load(path / "expected_block_quality.npy")
        self.quality = np.load(path / "expected_quality.npy").reshape(-1)
        self.embedding = np.load(path / "expected_embedding.npy")

    @property
    def checkpoint(self) -> Path:
        return self.path / "model.pt"


@pytest.fixture(scope="session")
def reference_root() -> Path:
    return reference_fixture_root()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "reference" in metafunc.fixturenames:
        dirs = reference_fixture_dirs()
        metafunc.parametrize(
            "reference", dirs or [None], ids=[d.name for d in dirs] or ["missing"], indirect=True
        )


@pytest.fixture
def reference(request: pytest.FixtureRequest) -> ReferenceFixture:
    if request.param is None:
        reference_fixture_root()  # fails with the reason
        pytest.fail("no fixture directories with a model.pt")
    return ReferenceFixture(request.param)


TOLERANCE = {"atol": 2e-5, "rtol": 1e-3}
RAY_NODE_TIMEOUT_S = 120  # a hang guard for test clusters' nodes (a few seconds idle)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real SeaweedFS S3 server on loopback for the whole session."""
    from tests.s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test; returns its name."""
    import re

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    fs.mkdir(name)
    return name


# ---- pipeline: a real Prefect (test harness) and a real two-node Ray cluster on loopback ---------------
@pytest.fixture(scope="session")
def prefect_harness():
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from fiqa_curator.flows.prefect_server import STARTUP_TIMEOUT_S

    with prefect_test_harness(server_startup_timeout=STARTUP_TIMEOUT_S):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes (raylets) on this machine, bound to loopback; the test process is the driver."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 2, "object_store_memory": 300 * 1024**2}
    cluster = Cluster()
    # Ray's waits for a node default to 30 s: too short for a busy 2-core machine, and this fixture's
    # failure would fail every Ray test of the session
    for args in ({**node_args, "include_dashboard": False}, node_args):
        cluster._wait_for_node(cluster.add_node(wait=False, **args), timeout=RAY_NODE_TIMEOUT_S)
    cluster.wait_for_nodes(timeout=RAY_NODE_TIMEOUT_S)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def run_score(prefect_harness, ray_cluster):
    """Run the real `fiqa-score` flow in-process on the test cluster; returns (summary, rows by image_id)."""
    from fiqa_curator.flows.options import ScoreOptions
    from fiqa_curator.flows.score import score_flow

    def run(input: str, output: str, **options):
        summary = score_flow(ScoreOptions(input=str(input), output=str(output), **options))
        return summary, read_quality_table(str(output), options.get("storage_options"))

    return run


@pytest.fixture
def run_cli(prefect_harness, ray_cluster, capsys):
    """`fiqa ARGS...` through the real command-line entry point, in-process on the test cluster;
    returns (exit status, printed output)."""
    from fiqa_curator.flows.cli import main

    def run(*args: str) -> tuple[int, str]:
        code = main([str(arg) for arg in args])
        return code, capsys.readouterr().out

    return run


def read_quality_table(output: str, storage_options: dict | None = None) -> dict[str, dict]:
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(output.rstrip("/") + "/scores", **(storage_options or {}))
    table = pq.read_table(root, filesystem=fs)
    rows = table.to_pylist()
    by_id = {row["image_id"]: row for row in rows}
    assert len(by_id) == len(rows), "an image_id appears twice in the quality table"
    return by_id
