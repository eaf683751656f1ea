"""The import direction of docs/architecture.md: schemas <- workers <- evaluation, demo_kit <- flows, and
the contracts each package must not know about. Read from the source (every import statement, at any
depth), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

ALLOWED = {  # package -> the fiqa_curator packages it may import
    "schemas": {"schemas"},
    "workers": {"schemas", "workers"},
    "evaluation": {"schemas", "workers", "evaluation"},
    "demo_kit": {"schemas", "workers", "demo_kit"},
    "flows": {"schemas", "workers", "evaluation", "demo_kit", "flows"},
}
FORBIDDEN_THIRD_PARTY = {  # the model side knows nothing of orchestration
    "schemas": {"ray", "prefect", "torch", "s3fs"},
    "workers": {"prefect"},
    "evaluation": {"ray", "prefect"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_downward_only(package: str) -> None:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files
    wrong = []
    for path in files:
        for module in _imports(path):
            parts = module.split(".")
            bare = (
                parts[0] in ALLOWED
            )  # a bare top-level name: not installed, works only from the repository root
            upward = parts[0] == "fiqa_curator" and len(parts) > 1 and parts[1] not in ALLOWED[package]
            if bare or upward or parts[0] in FORBIDDEN_THIRD_PARTY.get(package, ()):
                wrong.append(f"{path.relative_to(REPO_ROOT)}: {module}")
    assert not wrong, wrong
