"""`fiqa query`: SQL over a quality table with DuckDB, through fsspec (local or s3://).

The table is exposed as a view named `scores` (`flows.table_sql.quality_table`, with the memory limit and
spill folder every table command has). Results stream: the printed preview keeps only its first rows while
the rest are counted, and `--out` is written by DuckDB's `COPY ... TO`, so a result as large as the table
never gathers in Python.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import duckdb
import pyarrow as pa

from fiqa_curator.flows.storage import Output
from fiqa_curator.flows.table_sql import quality_table, quote
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.workers.io import filesystem

PREVIEW_BATCH_ROWS = 65_536
FORMATS = {".parquet": "(FORMAT parquet, COMPRESSION zstd)", ".csv": "(FORMAT csv, HEADER true)"}


def preview(
    output_url: str,
    sql: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    limit: int = 50,
    memory_limit: str | None = None,
) -> tuple[pa.Table, int]:
    """(the first `limit` rows of the result, how many rows it has)."""
    output = Output(output_url, storage_options)
    with quality_table(output, memory_limit=memory_limit) as connection:
        try:
            reader = connection.sql(sql).to_arrow_reader(PREVIEW_BATCH_ROWS)
            first, total = [], 0
            for batch in reader:
                if total < limit:
                    first.append(batch.slice(0, limit - total))
                total += batch.num_rows
            return pa.Table.from_batches(first, schema=reader.schema), total
        except duckdb.Error as error:
            raise UserError(f"query failed: {error}") from error


def query_to(
    output_url: str,
    sql: str,
    out_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    memory_limit: str | None = None,
) -> int:
    """Write the result to `out_url` (.csv or .parquet, local or any fsspec URL); returns its rows."""
    extension = os.path.splitext(out_url)[1].lower()
    if extension not in FORMATS:
        raise UserError(f"--out must end in .csv or .parquet, got {out_url}")
    output = Output(output_url, storage_options)
    with quality_table(output, memory_limit=memory_limit) as connection, tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "result" + extension)
        try:
            # the statement parsed on its own (a closing ";" or a trailing comment is the user's), then copied
            connection.sql(sql).create_view("fiqa_result")
            rows = connection.execute(f"COPY fiqa_result TO {quote(local)} {FORMATS[extension]}").fetchone()[
                0
            ]
        except duckdb.Error as error:
            raise UserError(f"query failed: {error}") from error
        fs, path = filesystem(out_url, storage_options)
        parent = os.path.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(local, path)
    return int(rows)
