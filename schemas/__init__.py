"""The project's contracts, declared once; a leaf package that every other one may import.

- `quality_table`: the per-image quality table `fiqa score` writes (`OUTPUT/scores/`), versioned;
- `status`: every status a row can have;
- `batch`: the columns of the batches that travel between the pipeline's stages, with their placeholders;
- `layout`: OUTPUT's files and the run record (`_run.json`);
- `identities`: the files `fiqa identities` writes under `OUTPUT/curation/`;
- `errors`: `UserError`, what the command line reports as one line with exit status 2.

Names are imported lazily: a reading task that needs `Status` does not pay for pydantic or pyarrow.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "QUALITY_TABLE_SCHEMA": "fiqa_curator.schemas.quality_table",
    "SCHEMA_VERSION": "fiqa_curator.schemas.quality_table",
    "SCORE_COLUMNS": "fiqa_curator.schemas.quality_table",
    "build_quality_table": "fiqa_curator.schemas.quality_table",
    "exit_score_matrix": "fiqa_curator.schemas.quality_table",
    "STATUS_VALUES": "fiqa_curator.schemas.status",
    "Status": "fiqa_curator.schemas.status",
    "RunRecord": "fiqa_curator.schemas.layout",
    "UserError": "fiqa_curator.schemas.errors",
}
__all__ = [
    "QUALITY_TABLE_SCHEMA",
    "SCHEMA_VERSION",
    "SCORE_COLUMNS",
    "STATUS_VALUES",
    "RunRecord",
    "Status",
    "UserError",
    "build_quality_table",
    "exit_score_matrix",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fiqa_curator.schemas' has no attribute {name!r}")


if TYPE_CHECKING:
    from fiqa_curator.schemas.errors import UserError
    from fiqa_curator.schemas.layout import RunRecord
    from fiqa_curator.schemas.quality_table import (
        QUALITY_TABLE_SCHEMA,
        SCHEMA_VERSION,
        SCORE_COLUMNS,
        build_quality_table,
        exit_score_matrix,
    )
    from fiqa_curator.schemas.status import STATUS_VALUES, Status
