"""The infrastructure definitions agree with the project: same pins, same Python, a well-formed KubeRay
cluster and a Prefect deployment whose entrypoint and parameters exist. (Docker and Kubernetes do not
run here: these checks are what can be verified without them.)"""

from __future__ import annotations

import inspect
import re
import tomllib

import yaml

from tests.conftest import REPO_ROOT


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _bytes(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(value))
    assert match, value
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def test_constraints_agree_with_pyproject() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    declared = {re.split(r"[<>=\[ ]", dep)[0].lower(): dep for dep in project["dependencies"]}
    for name in ("torch", "torchvision"):
        assert declared[name] == f"{name}=={pins[name]}"
    assert "ray" in declared and pins["ray"].startswith("2.")  # inside pyproject's ray range (>=2.50,<3)


def test_image_installs_the_project_with_the_same_pins_and_python() -> None:
    dockerfile = (REPO_ROOT / "infra" / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.12" and "python3.11 -m venv" in dockerfile
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", dockerfile, re.M)
    assert "pip install -c constraints.txt ." in dockerfile
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, re.M))
    assert {"pyproject.toml", "flows/", "workers/", "schemas/", "evaluation/", "demo_kit/"} <= copied
    folders = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {folder + "/" for folder in folders.values()} <= copied  # every folder the wheel installs


def test_raycluster_manifest_structure() -> None:
    cluster = yaml.safe_load((REPO_ROOT / "infra" / "k8s" / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == _pins()["ray"] and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert (
        "nvidia.com/gpu" not in str(head_container["resources"]) and head["rayStartParams"]["num-cpus"] == "0"
    )
    groups = spec["workerGroupSpecs"]
    gpu = next(group for group in groups if group["groupName"] == "gpu")
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > 1
    container = gpu["template"]["spec"]["containers"][0]
    resources = container["resources"]
    assert (
        resources["requests"]["nvidia.com/gpu"]
        == resources["limits"]["nvidia.com/gpu"]
        == gpu["rayStartParams"]["num-gpus"]
    )
    images = {head_container["image"], container["image"]}
    assert len(images) == 1  # head and workers run the same image (same Ray, same code)
    for group in (head, gpu):
        template = group["template"]["spec"]
        shm = next(v for v in template["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        store = float(group["rayStartParams"]["object-store-memory"])
        assert _bytes(shm["emptyDir"]["sizeLimit"]) > store  # the object store fits in /dev/shm
        mounts = template["containers"][0]["volumeMounts"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts
        memory = _bytes(template["containers"][0]["resources"]["limits"]["memory"])
        assert store < memory
    assert "AWS_SECRET_ACCESS_KEY" in str(container["env"]) and "secretKeyRef" in str(container["env"])


def test_prefect_yaml_deployment_matches_the_flow() -> None:
    from fiqa_curator.flows.nightly import nightly_score

    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    deployment = next(d for d in config["deployments"] if d["name"] == "nightly")
    path, name = deployment["entrypoint"].split(":")
    assert (REPO_ROOT / path).is_file() and name == nightly_score.fn.__name__
    accepted = set(inspect.signature(nightly_score.fn).parameters)
    assert set(deployment["parameters"]) <= accepted
    from fiqa_curator.flows.options import NightlyScoring

    NightlyScoring.model_validate(
        deployment["parameters"]["scoring"]
    )  # every option known, every value valid
    assert deployment["concurrency_limit"]["limit"] == 1
    from zoneinfo import ZoneInfo

    for schedule in deployment["schedules"]:
        ZoneInfo(schedule["timezone"])
        assert len(schedule["cron"].split()) == 5
    assert deployment["parameters"]["timezone"] == deployment["schedules"][0]["timezone"]
