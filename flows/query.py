"""`fiqa query`: SQL over a quality table with DuckDB, through fsspec (local or s3://).

The table is exposed as a view named `scores`. DuckDB reads object stores through the fsspec filesystem
registered on the connection (its own httpfs extension would need a download, which these machines
cannot do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import SCORES


def run_query(output_url: str, sql: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    output = Output(output_url, storage_options)
    output.require_table()
    connection = duckdb.connect()
    pattern = output.full_url(SCORES) + "/*.parquet"
    if "://" in pattern and not pattern.startswith("file://"):
        connection.register_filesystem(output.fs)
    else:
        pattern = pattern.removeprefix("file://")
    connection.execute(
        f"CREATE VIEW scores AS SELECT * FROM read_parquet('{pattern.replace(chr(39), chr(39) * 2)}')"
    )
    try:
        return connection.sql(sql).to_arrow_table()
    except duckdb.Error as error:
        raise UserError(f"query failed: {error}") from error
    finally:
        connection.close()


def write_result(table: pa.Table, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """CSV or Parquet by extension, to a local path or any fsspec URL."""
    from fiqa_curator.workers.io import filesystem

    fs, path = filesystem(url, storage_options)
    with fs.open(path, "wb") as handle:
        if url.endswith(".parquet"):
            pq.write_table(table, handle)
        elif url.endswith(".csv"):
            pacsv.write_csv(table, handle)
        else:
            raise UserError(f"--out must end in .csv or .parquet, got {url}")
