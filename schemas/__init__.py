"""Parquet schemas of fiqa-curator's tables, declared once and versioned.

`quality_table` is the per-image quality table written by `fiqa score`. `workers` never imports from here;
flows use it to build and validate every file they write.
"""

from schemas.quality_table import (
    QUALITY_TABLE_SCHEMA,
    SCHEMA_VERSION,
    SCORE_COLUMNS,
    STATUS_VALUES,
    build_quality_table,
    exit_score_matrix,
)

__all__ = ["QUALITY_TABLE_SCHEMA", "SCHEMA_VERSION", "SCORE_COLUMNS", "STATUS_VALUES", "build_quality_table", "exit_score_matrix"]
