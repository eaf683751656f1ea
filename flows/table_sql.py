"""DuckDB over OUTPUT's quality table, in memory that does not grow with the table.

Everything that reads a whole quality table (`fiqa report`, `select`, `query`) goes through
`quality_table`: a DuckDB connection with the table as the view `scores`, a memory limit the user sets
(`--memory-limit`; default `DEFAULT_MEMORY_SHARE` of this machine) and a private spill folder, so that
sorts and large aggregates go to disk instead of failing or swapping. Object stores are read through the
fsspec filesystem registered on the connection (DuckDB's own httpfs extension would need a download,
which these machines cannot do).

`order_statistics` finds exact order statistics (and so numpy's quantiles, to the last bit) with a
histogram pass and one small fetch, because DuckDB's exact `quantile_cont` keeps every value of the column
in memory: 800 MB for 100M rows. `files_in_id_order` lets a caller read the table in image_id order one
shard at a time, sorting a shard instead of the table.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import duckdb

from fiqa_curator.flows.options import DEFAULT_MEMORY_SHARE
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import SCORES

MIN_MEMORY_BYTES = 128 * 2**20
BUCKETS = 1 << 16  # histogram resolution of `order_statistics`
FETCH_LIMIT = 200_000  # values fetched at once by `order_statistics`; more means another histogram pass
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def machine_memory() -> int:
    """Bytes of memory this process may use: the physical memory, or the container's cgroup limit when
    lower (a pod limited to 16Gi on a 256 GB node must not plan for 64 GB)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMITS:
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 reports a huge number instead
            return min(physical, int(text))
    return physical


def memory_limit_bytes(text: str | None) -> int:
    """`--memory-limit` in bytes: '2GB', '512MiB', '25%' (of this machine), a bare number of bytes, or
    None for the default share."""
    if text is None:
        return max(MIN_MEMORY_BYTES, int(DEFAULT_MEMORY_SHARE * machine_memory()))
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"--memory-limit must look like 2GB, 512MiB or 25%, got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise UserError(f"--memory-limit as a share must be in (0, 100]%, got {text!r}")
        value = int(number / 100 * machine_memory())
    else:
        value = int(number * _UNITS[unit])
    if value < MIN_MEMORY_BYTES:
        raise UserError(f"--memory-limit must be at least {MIN_MEMORY_BYTES // 2**20}MiB, got {text!r}")
    return value


def quote(text: str) -> str:
    """An SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def double(value: float) -> str:
    """`value` as an exact SQL DOUBLE (a bare literal such as 0.1 would be a DECIMAL)."""
    return f"CAST({quote(repr(float(value)))} AS DOUBLE)"


def local_or_url(output: Output, relative: str) -> str:
    """What DuckDB opens for OUTPUT/`relative`: a plain path for local OUTPUTs, else the fsspec URL."""
    url = output.full_url(relative)
    return url.removeprefix("file://")


def files_pattern(output: Output, folder: str = SCORES) -> str:
    """The glob DuckDB reads for `folder`'s Parquet files."""
    return local_or_url(output, folder) + "/*.parquet"


@contextmanager
def connect(
    output: Output | None = None, *, memory_limit: str | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection with the memory limit and a spill folder of its own (removed afterwards); with
    `output`, its filesystem registered when remote."""
    limit = f"{memory_limit_bytes(memory_limit) // 2**20}MiB"  # refused before anything is created
    spill = tempfile.mkdtemp(prefix="fiqa-duckdb-")
    try:
        connection = duckdb.connect(config={"memory_limit": limit, "temp_directory": spill})
        # no progress bar: it would land in the middle of the command's own output (and in logs)
        connection.execute("SET enable_progress_bar = false")
    except BaseException:
        shutil.rmtree(spill, ignore_errors=True)
        raise
    try:
        if output is not None and "://" in files_pattern(output):
            connection.register_filesystem(output.fs)
        yield connection
    finally:
        connection.close()
        shutil.rmtree(spill, ignore_errors=True)


@contextmanager
def quality_table(output: Output, *, memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """`connect`, with OUTPUT's quality table as the view `scores` (OutputError when it has none)."""
    output.require_table()
    with connect(output, memory_limit=memory_limit) as connection:
        connection.execute(
            f"CREATE VIEW scores AS SELECT * FROM read_parquet({quote(files_pattern(output))})"
        )
        yield connection


def scalar(connection: duckdb.DuckDBPyConnection, sql: str, parameters: Sequence[Any] = ()) -> Any:
    row = connection.execute(sql, list(parameters)).fetchone()
    return row[0] if row else None


def order_statistics(
    connection: duckdb.DuckDBPyConnection, relation: str, value: str, ranks: Sequence[int]
) -> dict[int, float]:
    """The values at 0-based `ranks` of `value` (a DOUBLE expression) over `relation` (a FROM clause,
    WHERE included) sorted ascending: what `np.sort(values)[rank]` gives, in bounded memory.

    A histogram of BUCKETS buckets finds each rank's bucket; a bucket of at most FETCH_LIMIT values is
    fetched and sorted, a larger one (heavy ties, extreme skew) narrowed by another histogram."""
    wanted = sorted(set(int(rank) for rank in ranks))
    return _order_statistics(connection, relation, value, wanted, "TRUE", 0)


def _order_statistics(
    connection: duckdb.DuckDBPyConnection,
    relation: str,
    value: str,
    ranks: list[int],
    condition: str,
    offset: int,
) -> dict[int, float]:
    """`ranks` (global) over the rows of `relation` meeting `condition`, which hold ranks offset.."""
    if not ranks:
        return {}
    low, high, count = connection.execute(
        f"SELECT min(v), max(v), count(*) FROM (SELECT {value} AS v FROM {relation}) WHERE {condition}"
    ).fetchone()
    if not count or any(not offset <= rank < offset + count for rank in ranks):
        raise ValueError(f"ranks {ranks[0]}..{ranks[-1]} outside {offset}..{offset + (count or 0) - 1}")
    if low == high:
        return dict.fromkeys(ranks, float(low))
    if count <= FETCH_LIMIT:
        values = [
            row[0]
            for row in connection.execute(
                f"SELECT v FROM (SELECT {value} AS v FROM {relation}) WHERE {condition} ORDER BY v"
            ).fetchall()
        ]
        return {rank: float(values[rank - offset]) for rank in ranks}
    # the same expression decides a value's bucket in both passes, so no value is counted twice or lost
    bucket = f"least({BUCKETS - 1}, CAST(floor((v - {low!r}) / ({high!r} - {low!r}) * {BUCKETS}) AS BIGINT))"
    counts = dict(
        connection.execute(
            f"SELECT {bucket} AS b, count(*) FROM (SELECT {value} AS v FROM {relation}) "
            f"WHERE {condition} GROUP BY b"
        ).fetchall()
    )
    found: dict[int, float] = {}
    start, pending = offset, list(ranks)
    for b in sorted(counts):
        inside = [rank for rank in pending if rank < start + counts[b]]
        if inside:
            found.update(
                _order_statistics(
                    connection, relation, value, inside, f"({condition}) AND {bucket} = {b}", start
                )
            )
            pending = pending[len(inside) :]
        if not pending:
            break
        start += counts[b]
    return found


def quantiles(
    connection: duckdb.DuckDBPyConnection, relation: str, value: str, qs: Sequence[float], count: int
) -> list[float]:
    """numpy's default ('linear') quantiles of `value` over `relation`'s `count` rows, bit for bit."""
    positions = [q * (count - 1) for q in qs]
    ranks = [r for p in positions for r in (math.floor(p), math.ceil(p))]
    values = order_statistics(connection, relation, value, ranks)
    return [_lerp(values[math.floor(p)], values[math.ceil(p)], p - math.floor(p)) for p in positions]


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's `_lerp` (numpy/lib/_function_base_impl.py), so that thresholds equal np.quantile's."""
    difference = b - a
    return float(b - difference * (1 - t) if t >= 0.5 else a + difference * t)


def files_in_id_order(connection: duckdb.DuckDBPyConnection, output: Output) -> list[str] | None:
    """The quality table's files ordered by image_id, when their id ranges do not overlap (fiqa's shards
    are contiguous ranges of the sorted listing, each sorted inside), else None. Reading them one by one
    in this order and sorting each gives the whole table in image_id order: a sort the size of a shard
    instead of one the size of the table (one scan of the id column finds the ranges)."""
    rows = connection.execute(
        f"""SELECT filename, min(image_id), max(image_id)
            FROM read_parquet({quote(files_pattern(output))}, filename = true)
            GROUP BY filename HAVING count(*) > 0 ORDER BY 2"""
    ).fetchall()
    if any(not high < low for (_, _, high), (_, low, _) in itertools.pairwise(rows)):
        return None
    return [name for name, _, _ in rows]
