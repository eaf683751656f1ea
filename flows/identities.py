"""`fiqa identities`: mislabelled images, near-duplicates and identities filed twice, weighted by quality.

Input: a finished quality table whose rows carry an `identity`, and embeddings: the table's own
`embedding` column (`fiqa score --embeddings`) or any face-recognition model's, joined by `image_id`
(`--embeddings FILE`: Parquet with `image_id` and `embedding`, a file or a folder, any fsspec URL).
Output under OUTPUT/curation/ (`schemas.identities`): identity_images.parquet, identities.parquet and
identities.json (the thresholds, where each came from, counts).

How it runs, in memory that does not grow with the table:
1. DuckDB ranks the scored images' quality with one histogram pass (`QualityRanks`: the weights, see
   `evaluation.identities`; no sort of the table), then joins the table with the embeddings into work
   partitions of whole identities (a hash of the name), local files each small enough to sort within
   `--memory-limit`; with several, both sides are first scattered into buckets by image_id, so that the
   join reads each once and no join holds more than a bucket (`_write_work_files`).
2. Thresholds the user did not set are estimated from a sample of the partitions' identities
   (`estimate_thresholds`, below).
3. The partitions are read once, each sorted by identity, a chunk of whole identities at a time:
   leave-one-out similarities, the images below the outlier similarity (with one refit), near-duplicates,
   and each identity's centre. Per-image results go to a second local file, the images below the outlier
   similarity (every usable one with `all_rivals`) with their embeddings to a third, the first
   MARGIN_SAMPLE_ROWS usable images stay in memory; per-identity counts and centres stay (an identity
   costs its name and one float32 vector).
4. faiss indexes the centres: each centre's nearest other centre (merge candidates); the margin and
   stranger thresholds from the kept sample (`_rival_thresholds`); each image of the third file's rival
   and margin, which may clear it of being an outlier (`_clear_by_margin`, correcting the counts).
5. DuckDB sorts the per-image results by image_id, joined with the rivals (so that `fiqa select` and
   analysts can read them alongside the quality table), and both files are committed to OUTPUT.

Default thresholds, derived from the data because cosine similarities of different face-recognition
models live on different scales (dlib's different people sit near 0.9, ArcFace's near 0):
- outlier: halfway between the median *genuine* similarity (an image to its own identity's centre,
  leave-one-out) and the median *impostor* similarity (an image to the centre of a random other
  identity). A mislabelled image is an impostor to the centre of the label it was given: it is flagged
  when it looks more like a typical stranger than like a typical member. Medians, not tail quantiles,
  because the sample is contaminated by the very problems being looked for (mislabelled images among
  the genuine, an identity filed twice among the impostors) and because a tail quantile of a mixture
  of clean and degraded images says more about the degradations than about identities.
- merge: the median similarity of images to their own identity's centre. Two centres more alike than a
  typical image is to its own centre describe one person (a centre averages many images, so two halves
  of one identity are closer to each other than a single image is to either).
- duplicate: a quarter of the merge threshold's distance from 1 (cosine `1 - (1 - merge) / 4`): much
  closer than two different photographs of one person usually are.
- margin (`evaluation.identities.margin_sample`): halfway between the median rival margin of images filed
  under their own identity and filed under a random other one (a simulated mislabel); stranger: the
  median similarity of an image to a random other identity's centre. Both from the first
  MARGIN_SAMPLE_ROWS usable images, searched against every centre.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa_curator.evaluation.identities import (
    CentreIndex,
    group_of,
    judge,
    margin_sample,
    near_duplicates,
    nearest_in,
    rivals,
    similarity_to_centre,
    unit_rows,
)
from fiqa_curator.flows.curation import score_expression
from fiqa_curator.flows.storage import Output
from fiqa_curator.flows.table_sql import connect, double, files_pattern, memory_limit_bytes, quote
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.identities import IDENTITIES_SCHEMA, IDENTITY_IMAGES_SCHEMA
from fiqa_curator.schemas.layout import (
    IDENTITIES_FILE,
    IDENTITY_IMAGES_FILE,
    IDENTITY_SUMMARY_FILE,
    SCORES,
)
from fiqa_curator.schemas.status import Status
from fiqa_curator.workers.io import filesystem

RANK_BUCKETS = 1 << 16  # resolution of the quality ranks (QualityRanks)
CHUNK_ROWS = 65_536  # rows read from the work file at a time (whole identities are processed together)
SAMPLE_ROWS = 200_000  # rows the default thresholds are estimated from
MARGIN_SAMPLE_ROWS = 20_000  # images the default margin threshold is estimated from (two searches each)
ROW_OVERHEAD_BYTES = 96  # a work row's bytes besides its embedding (ids, flags, score), for partitioning
PARTITION_SHARE = 0.25  # a work partition's bytes, as a share of the memory limit
DUPLICATE_SHARE = 0.25  # the duplicate threshold's distance from 1, as a share of the merge threshold's
IMPOSTOR_POOL = 1_024  # recent identity centres an image may be compared with as an impostor
SEED = 20261202
TABLE_EMBEDDINGS = "the quality table"  # the embeddings' source when they are the table's own column


@dataclass
class Thresholds:
    outlier: float
    duplicate: float
    merge: float
    source: dict[str, str] = field(default_factory=dict)  # per threshold: "set" or how it was derived
    # an image below `outlier` is an outlier unless its rival margin reaches this (None: the rule is off)...
    margin: float | None = None
    # ...and its similarity reaches this: the median similarity of an image to a stranger's centre
    stranger: float | None = None


@dataclass
class IdentitySummary:
    output: str
    table: str  # Output.table_fingerprint() of the quality table the results describe
    embeddings: str
    by: str
    weighted: bool
    images: int  # rows with an identity
    without_identity: int
    usable: int
    identities: int
    outliers: int
    duplicates: int
    kept: int
    merge_candidates: int
    thresholds: Thresholds
    # images below the outlier similarity; those whose rival margin reached the margin threshold are kept
    below_similarity: int
    nearest_method: str
    work_partitions: int  # the partitions of whole identities the work was cut into (memory)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # the process's peak by each stage's end


def _embedding_relation(
    connection: duckdb.DuckDBPyConnection, output: Output, embeddings: str | None, storage: Mapping
) -> tuple[str, str]:
    """(a FROM clause giving `image_id`, `embedding` FLOAT[] per image, a description of the source)."""
    if embeddings is None:
        names = {row[0] for row in connection.execute("DESCRIBE scores").fetchall()}
        if "embedding" not in names:
            raise UserError(
                "the quality table has no `embedding` column: score with `fiqa score --embeddings`, or pass "
                "--embeddings FILE (Parquet with image_id and embedding, from any face-recognition model)"
            )
        return "(SELECT image_id, CAST(embedding AS FLOAT[]) AS embedding FROM scores)", TABLE_EMBEDDINGS
    fs, path = filesystem(embeddings, storage)
    if fs.isdir(path):
        inner = path.rstrip("/") + "/" + SCORES
        path = (inner if fs.isdir(inner) else path.rstrip("/")) + "/*.parquet"
    elif not fs.exists(path):
        raise UserError(f"--embeddings {embeddings}: no such file")
    url = fs.unstrip_protocol(path).removeprefix("file://")
    if "://" in url and fs is not output.fs:
        connection.register_filesystem(fs)
    source = f"read_parquet({quote(url)})"
    try:
        names = {row[0] for row in connection.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    except duckdb.Error as error:
        raise UserError(f"--embeddings {embeddings}: not readable as Parquet: {error}") from None
    if not {"image_id", "embedding"} <= names:
        raise UserError(f"--embeddings {embeddings}: needs `image_id` and `embedding` columns")
    relation = (
        "(SELECT CAST(image_id AS VARCHAR) AS image_id, CAST(embedding AS FLOAT[]) AS embedding "
        f"FROM {source})"
    )
    return relation, embeddings


@dataclass
class QualityRanks:
    """The share of the table's scored images at or below each score, at the resolution of RANK_BUCKETS
    buckets over the score's range: `cume_dist` without sorting the table (one histogram pass)."""

    low: float
    high: float
    cumulative: np.ndarray  # per bucket: share of scored images in it or below

    def __call__(self, quality: np.ndarray) -> np.ndarray:
        if self.high <= self.low:
            return np.ones(len(quality))
        scaled = (np.nan_to_num(quality, nan=self.low) - self.low) / (self.high - self.low)
        bucket = np.clip((scaled * RANK_BUCKETS).astype(np.int64), 0, RANK_BUCKETS - 1)
        return self.cumulative[bucket]


def quality_ranks(connection: duckdb.DuckDBPyConnection, score: str) -> QualityRanks | None:
    """The scored images' ranks by `score` (None: the table has no scored image)."""
    finite = f"(status = {quote(Status.OK.value)} AND coalesce(isfinite({score}), false))"
    low, high, count = connection.execute(
        f"SELECT min({score}), max({score}), count(*) FROM scores WHERE {finite}"
    ).fetchone()
    if not count:
        return None
    if high <= low:
        return QualityRanks(float(low), float(high), np.ones(RANK_BUCKETS))
    bucket = (
        f"least({RANK_BUCKETS - 1}, CAST(floor(({score} - {double(low)}) / ({double(high)} - {double(low)}) "
        f"* {RANK_BUCKETS}) AS BIGINT))"
    )
    counts = np.zeros(RANK_BUCKETS)
    for index, number in connection.execute(
        f"SELECT {bucket} AS b, count(*) FROM scores WHERE {finite} GROUP BY b"
    ).fetchall():
        counts[int(index)] = number
    return QualityRanks(float(low), float(high), np.cumsum(counts) / count)


class _Scatter:
    """Rows streamed into `count` local Arrow IPC stream files by an integer key column, a batch at a time.
    Memory holds a batch and its reordered copy, whatever the input's size: a stream writer keeps nothing
    per batch written (Parquet's kept each row group's metadata, about 5 KB, until closed: batches x files
    in all). A file is created when its first row arrives. Read back with `_arrow_file`."""

    def __init__(self, folder: str, prefix: str, count: int) -> None:
        self.paths = [os.path.join(folder, f"{prefix}-{index:06d}.arrows") for index in range(count)]
        self.rows = np.zeros(count, np.int64)
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self._schemas: dict[int, pa.Schema] = {}
        self._closed = False

    def __enter__(self) -> _Scatter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def write(
        self, reader: pa.RecordBatchReader, key: str, check: Callable[[pa.RecordBatch], None] | None = None
    ) -> int:
        """Each of `reader`'s batches (after `check`), by its column `key` (dropped); returns the rows."""
        written = 0
        for batch in reader:
            if check is not None:
                check(batch)
            keys = batch.column(key).to_numpy(zero_copy_only=False)
            sizes = np.bincount(keys, minlength=len(self.paths))
            present = np.flatnonzero(sizes)
            rows = pa.Table.from_batches([batch]).drop_columns([key])
            if len(present) > 1:
                rows = rows.take(pa.array(np.argsort(keys, kind="stable")))
            start = 0
            for index in present:
                if index not in self._writers:
                    self._writers[index] = pa.ipc.new_stream(self.paths[index], rows.schema)
                    self._schemas[index] = rows.schema
                part = rows.slice(start, sizes[index])
                schema = self._schemas[index]
                self._writers[index].write_table(part if part.schema == schema else part.cast(schema))
                start += sizes[index]
            self.rows += sizes
            written += batch.num_rows
        return written

    def close(self) -> list[str]:
        """The files written (those that got rows), in key order. Safe to call more than once."""
        if not self._closed:
            self._closed = True
            with contextlib.ExitStack() as closing:  # every writer closed, even if one fails
                for writer in self._writers.values():
                    closing.callback(writer.close)
        return [self.paths[index] for index in sorted(self._writers)]


def _arrow_file(path: str) -> pa.RecordBatchReader:
    """A local Arrow IPC stream file (`_Scatter`'s), read a batch at a time as DuckDB scans it (once): a
    memory-mapped file would count in RSS, whole, while it is scanned."""
    return pa.ipc.open_stream(pa.OSFile(path))


def _allow_open_files(count: int) -> None:
    """Let this process hold `count` files open at once (one per work partition: hundreds at 100M images),
    raising its soft limit up to the hard one; fail now, not after the first hour of scattering."""
    try:
        import resource
    except ImportError:  # not on Unix: no limit to raise here
        return
    needed = count + 256  # and the rest of the process: DuckDB's spill files, libraries, sockets
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    allowed = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
    if allowed < needed:
        raise UserError(
            f"the join writes {count} work partitions at once and needs {needed} open files; this process "
            f"may open {hard}: raise the limit (`ulimit -n`) or give more memory (--memory-limit)"
        )


class _Dimension:
    """The embeddings' common length, checked batch by batch on the join's rows (no pass of its own)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.low: int | None = None
        self.high: int | None = None

    def __call__(self, batch: pa.RecordBatch) -> None:
        lengths = pc.list_value_length(batch.column("embedding"))
        low, high = pc.min(lengths).as_py(), pc.max(lengths).as_py()
        if low is not None:
            self.low = low if self.low is None else min(self.low, low)
            self.high = high if self.high is None else max(self.high, high)

    def value(self, first: int) -> int:
        """The length, checked against `first` (the one the partitions were sized with)."""
        if self.low is None or self.high is None:
            where = (
                "its own `embedding` column"
                if self.source == TABLE_EMBEDDINGS
                else f"--embeddings {self.source}"
            )
            raise UserError(f"no image of the quality table with an identity has an embedding in {where}")
        low, high = min(self.low, first), max(self.high, first)
        if low != high or low == 0:
            raise UserError(f"embeddings must all have one length; found {low} to {high}")
        return low


def _write_work_files(
    connection: duckdb.DuckDBPyConnection,
    score: str,
    embedding_relation: str,
    source: str,
    folder: str,
    memory: int,
) -> tuple[int, int, int, int, list[str]]:
    """The rows with an identity and their embeddings, in partitions of whole identities (by a hash of
    the name) small enough to sort in `memory`, one local Arrow file each (`_Scatter`).

    One partition: one streaming join. Several: the join reads each input once, and every join is bounded
    by memory, not by the table:
    1. the table's rows with an identity, then the embeddings, are scattered by a hash of image_id into
       as many buckets, a batch at a time;
    2. each bucket's two halves are joined (the bucket's table rows are the hash table), its output
       scattered into the identity partitions (a hash of the name), and the bucket's files removed.
    Work grows with the rows (the embeddings written twice and read twice here, once more by the judging
    pass); memory with a batch and a bucket; local disk with one uncompressed copy of all the source's
    embeddings (those of images without an identity, or not in the table, too) and a bucket.
    Inputs on object storage are read once, like local ones. The embeddings' length is checked on the
    rows the join gives (`_Dimension`), not in a pass of its own.
    Measured and replaced (docs/benchmarks.md): one join written with DuckDB's PARTITION_BY (its writers
    held about 0.8 KB per row beyond the memory limit: 3.3 GB at 10M images under 2 GB); one join per
    partition (flat memory, but the embeddings read once per partition, so rows x rows / memory: 13 reads
    at 10M under 2 GB).
    Returns (rows with an identity, rows without one, identities, the embeddings' dimension, the
    partitions' files)."""
    rows, without, identities = connection.execute(
        "SELECT count(*) FILTER (WHERE coalesce(identity, '') <> ''), "
        "count(*) FILTER (WHERE coalesce(identity, '') = ''), "
        "count(DISTINCT identity) FILTER (WHERE coalesce(identity, '') <> '') FROM scores"
    ).fetchone()
    if not rows:
        raise UserError("no image of the quality table has an identity (the manifest's `identity` column)")
    os.makedirs(folder, exist_ok=True)
    connection.execute("SET preserve_insertion_order = false")  # a streaming join needs no order
    dimension = _Dimension(source)
    table = (
        f"(SELECT image_id, identity, status, {score} AS score FROM scores "
        "WHERE coalesce(identity, '') <> '')"
    )
    ok = quote(Status.OK.value)
    work_row = f"""s.image_id, s.identity, s.status = {ok} AS ok,
        CASE WHEN isfinite(s.score) THEN s.score END AS quality,
        coalesce(s.status = {ok} AND isfinite(s.score) AND e.embedding IS NOT NULL, false) AS usable,
        e.embedding"""

    def joined(table: str, embeddings: str, key: str = "") -> str:
        return f"SELECT {key}{work_row} FROM {table} s LEFT JOIN {embeddings} e ON e.image_id = s.image_id"

    # the partitions' count needs a row's bytes: the first embedding's length (the query stops there);
    # every length is checked as the join's rows stream past (`_Dimension`)
    first = connection.execute(
        f"SELECT len(embedding) FROM {embedding_relation} WHERE embedding IS NOT NULL LIMIT 1"
    ).fetchall()  # fetchone() here left the result open in DuckDB 2: the next statement was refused
    if not first:
        raise UserError("no image has an embedding")
    length = int(first[0][0])
    partitions = max(1, math.ceil(rows * (4 * length + ROW_OVERHEAD_BYTES) / (memory * PARTITION_SHARE)))
    _allow_open_files(partitions)
    by_identity = f"(hash(s.identity) % {partitions})::INTEGER AS _key, "
    with _Scatter(folder, "part", partitions) as parts:
        if partitions == 1:
            reader = connection.sql(joined(table, embedding_relation, by_identity)).to_arrow_reader(
                CHUNK_ROWS
            )
            _check_once(parts.write(reader, "_key", dimension), int(rows), source)
        else:
            _join_by_buckets(
                connection, table, embedding_relation, joined, by_identity, parts, dimension, folder
            )
    return int(rows), int(without), int(identities), dimension.value(length), parts.close()


def _join_by_buckets(
    connection: duckdb.DuckDBPyConnection,
    table: str,
    embedding_relation: str,
    joined: Callable[[str, str, str], str],
    by_identity: str,
    parts: _Scatter,
    dimension: _Dimension,
    folder: str,
) -> None:
    """`_write_work_files` with several partitions: both sides scattered by a hash of image_id into as
    many buckets (a bucket's table rows, a join's hash table, are as many as a partition's, without their
    embeddings), then each bucket joined and its rows scattered into `parts`."""
    buckets = len(parts.paths)
    by_image = f"(hash(image_id) % {buckets})::INTEGER AS _key"
    with _Scatter(folder, "table", buckets) as table_buckets:
        table_buckets.write(
            connection.sql(f"SELECT {by_image}, * FROM {table}").to_arrow_reader(CHUNK_ROWS), "_key"
        )
    with _Scatter(folder, "embeddings", buckets) as embedding_buckets:
        embedding_buckets.write(
            connection.sql(
                f"SELECT {by_image}, image_id, embedding FROM {embedding_relation} WHERE image_id IS NOT NULL"
            ).to_arrow_reader(CHUNK_ROWS),
            "_key",
        )
    for bucket in np.flatnonzero((embedding_buckets.rows > 0) & (table_buckets.rows == 0)):
        os.remove(embedding_buckets.paths[bucket])  # embeddings of images the table does not have
    for bucket in np.flatnonzero(table_buckets.rows):
        table_file, embedding_file = table_buckets.paths[bucket], embedding_buckets.paths[bucket]
        connection.register("bucket_table", _arrow_file(table_file))
        embeddings = "(SELECT NULL::VARCHAR AS image_id, NULL::FLOAT[] AS embedding WHERE false)"
        if embedding_buckets.rows[bucket]:
            connection.register("bucket_embeddings", _arrow_file(embedding_file))
            embeddings = "bucket_embeddings"
        reader = None
        try:
            reader = connection.sql(joined("bucket_table", embeddings, by_identity)).to_arrow_reader(
                CHUNK_ROWS
            )
            written = parts.write(reader, "_key", dimension)
        finally:  # a reader read in part would block the connection (and the names' removal)
            if reader is not None:
                reader.close()
            connection.unregister("bucket_table")
            if embedding_buckets.rows[bucket]:
                connection.unregister("bucket_embeddings")
        _check_once(written, int(table_buckets.rows[bucket]), source=dimension.source)
        for done in (table_file, embedding_file):  # local disk: about one copy of the embeddings at a time
            if os.path.exists(done):
                os.remove(done)


def _check_once(written: int, expected: int, source: str) -> None:
    """The join gave each of the table's images one row (the table's image_ids are unique: the
    embeddings' may not be)."""
    if written != expected:
        extra = f"at least {written - expected} extra row(s)"  # found in this part of the table
        raise UserError(
            f"--embeddings {source}: image_ids of the table appear more than once ({extra}); each must "
            "appear once"
            if source != TABLE_EMBEDDINGS
            else f"the quality table repeats image_ids ({extra})"
        )


def _sorted_batches(connection: duckdb.DuckDBPyConnection, parts: list[str]) -> Iterator[pa.RecordBatch]:
    """The work partitions one after the other, each sorted by identity then image_id (in memory or
    spilled by DuckDB): every identity's rows arrive together."""
    for part in parts:
        rows = connection.from_arrow(_arrow_file(part))  # image_id, identity, ok, quality, usable, embedding
        reader = rows.order("identity, image_id").to_arrow_reader(CHUNK_ROWS)
        try:
            yield from reader
        finally:  # a caller that stops early (the thresholds' sample) leaves the connection free
            reader.close()


@dataclass
class Chunk:
    """Whole identities read from the work file."""

    table: pa.Table
    starts: np.ndarray  # each identity's first row
    units: np.ndarray
    usable: np.ndarray
    weights: np.ndarray
    quality: np.ndarray


Weigh = Callable[[np.ndarray], np.ndarray]  # quality -> weight (QualityRanks, or all ones)


def _chunk(table: pa.Table, dimension: int, weigh: Weigh) -> Chunk:
    identity = table.column("identity").combine_chunks()
    changed = pc.not_equal(identity.slice(1), identity.slice(0, len(identity) - 1)).to_numpy(
        zero_copy_only=False
    )
    starts = np.flatnonzero(np.r_[True, changed]) if len(identity) else np.zeros(0, np.int64)
    vectors = np.zeros((table.num_rows, dimension), dtype=np.float32)
    embedding = table.column("embedding").combine_chunks()
    present = embedding.is_valid().to_numpy(zero_copy_only=False)
    if present.any():
        values = embedding.flatten().to_numpy(zero_copy_only=False)
        vectors[present] = values.reshape(-1, dimension)
    units, finite = unit_rows(vectors)
    usable = table.column("usable").to_numpy(zero_copy_only=False) & finite
    quality = table.column("quality").to_numpy(zero_copy_only=False).astype(np.float64)
    weights = np.where(usable, weigh(quality), 0.0)
    return Chunk(table, starts, units, usable, weights, np.nan_to_num(quality, nan=-np.inf))


def _whole_identities(batches: Iterable[pa.RecordBatch], dimension: int, weigh: Weigh) -> Iterator[Chunk]:
    """`batches` (sorted by identity) a chunk of whole identities at a time: the last identity of a
    batch waits for the next, since it may continue there."""
    carried: pa.Table | None = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        if carried is not None:
            table = pa.concat_tables([carried, table])
        identity = table.column("identity")
        last = identity[-1]
        tail = pc.sum(pc.equal(identity, last)).as_py()
        carried = table.slice(table.num_rows - tail)
        if table.num_rows > tail:
            yield _chunk(table.slice(0, table.num_rows - tail), dimension, weigh)
    if carried is not None and carried.num_rows:
        yield _chunk(carried, dimension, weigh)


def estimate_thresholds(
    batches: Iterable[pa.RecordBatch], dimension: int, weigh: Weigh
) -> tuple[float, float, int]:
    """(median impostor similarity, median genuine similarity, images sampled) from the first whole
    identities of `batches` up to SAMPLE_ROWS images (the work partitions are random sets of identities,
    by a hash of their names). Genuine: an image's leave-one-out similarity to its own identity's centre
    (quality-weighted). Impostor: its similarity to the centre of an identity drawn at random among the
    last IMPOSTOR_POOL identities seen (names are sorted, so neighbours are unrelated)."""
    genuine, impostor = _similarity_samples(batches, dimension, weigh)
    if len(impostor) == 0 or len(genuine) == 0:
        raise UserError(
            "too few identities with usable images to derive the thresholds: set --outlier-similarity "
            "and --merge-similarity"
        )
    return float(np.median(impostor)), float(np.median(genuine)), len(impostor)


def _similarity_samples(
    batches: Iterable[pa.RecordBatch], dimension: int, weigh: Weigh
) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) similarities of the usable images of the first whole identities of `batches`,
    up to SAMPLE_ROWS images."""
    rng = np.random.default_rng(SEED)
    genuine: list[np.ndarray] = []
    impostor: list[np.ndarray] = []
    pool = np.zeros((0, dimension), dtype=np.float32)
    pool_names: np.ndarray = np.zeros(0, dtype=object)
    seen = 0
    for chunk in _whole_identities(batches, dimension, weigh):
        if seen >= SAMPLE_ROWS:
            break
        seen += chunk.table.num_rows
        similarity = similarity_to_centre(chunk.units, chunk.weights, chunk.starts, chunk.usable)
        genuine.append(similarity[np.isfinite(similarity)])
        sums = np.add.reduceat(chunk.units * chunk.weights[:, None], chunk.starts, axis=0)
        centres, has = unit_rows(sums)
        names = np.asarray(
            chunk.table.column("identity").take(pa.array(chunk.starts)).to_pylist(), dtype=object
        )
        pool = np.concatenate([pool, centres[has]])[-IMPOSTOR_POOL:]
        pool_names = np.concatenate([pool_names, names[has]])[-IMPOSTOR_POOL:]
        if len(pool) < 2:
            continue
        rows = np.flatnonzero(chunk.usable)
        own = np.repeat(names, np.diff(np.append(chunk.starts, chunk.table.num_rows)))[rows]
        drawn = rng.integers(0, len(pool), size=len(rows))
        same = pool_names[drawn] == own
        drawn[same] = (drawn[same] + 1) % len(pool)  # another identity (pool names are distinct)
        impostor.append(np.einsum("ij,ij->i", chunk.units[rows], pool[drawn]))
    return (
        np.concatenate(genuine) if genuine else np.zeros(0),
        np.concatenate(impostor) if impostor else np.zeros(0),
    )


def _thresholds(
    batches: Callable[[], Generator[pa.RecordBatch, None, None]],
    dimension: int,
    weigh: Weigh,
    outlier: float | None,
    duplicate: float | None,
    merge: float | None,
) -> Thresholds:
    source = {}
    if outlier is not None and merge is not None:  # the duplicate threshold's default needs merge only
        if duplicate is None:
            duplicate = 1 - DUPLICATE_SHARE * (1 - merge)
            source["duplicate"] = f"1 - {DUPLICATE_SHARE:g} x (1 - merge threshold)"
        source.setdefault("duplicate", "set")
        return Thresholds(
            float(outlier), float(duplicate), float(merge), {"outlier": "set", "merge": "set", **source}
        )
    with contextlib.closing(batches()) as sample:  # a generator: closed at once, not when collected
        impostor, genuine, sampled = estimate_thresholds(sample, dimension, weigh)
    if outlier is None:
        outlier = (impostor + genuine) / 2
        source["outlier"] = (
            f"halfway between the median similarity of {sampled} images to their own identity's centre "
            f"({genuine:.4f}) and to a random other identity's ({impostor:.4f})"
        )
    if merge is None:
        merge = genuine
        source["merge"] = f"median similarity of {sampled} images to their own identity's centre"
    if duplicate is None:
        duplicate = 1 - DUPLICATE_SHARE * (1 - merge)
        source["duplicate"] = f"1 - {DUPLICATE_SHARE:g} x (1 - merge threshold)"
    for name in ("outlier", "duplicate", "merge"):
        source.setdefault(name, "set")
    return Thresholds(float(outlier), float(duplicate), float(merge), source)


@dataclass
class _PerIdentity:
    """Filled in identity order by `_judge_all`: arrays sized once (the identities are counted first), so
    that a million identities cost their centres once, not once per copy."""

    names: list[pa.Array]
    counts: np.ndarray  # (identities, 5): images, usable, outliers, duplicates, kept
    centres: np.ndarray  # (identities, dimension) float32, unit length; zeros: no usable image
    has_centre: np.ndarray
    filled: int = 0

    @classmethod
    def empty(cls, identities: int, dimension: int) -> _PerIdentity:
        return cls(
            names=[],
            counts=np.zeros((identities, 5), np.int64),
            centres=np.zeros((identities, dimension), np.float32),
            has_centre=np.zeros(identities, bool),
        )


@dataclass
class _MarginStash:
    """The first MARGIN_SAMPLE_ROWS usable images met by `_judge_all`, kept for the margin threshold."""

    units: list[np.ndarray] = field(default_factory=list)
    similarity: list[np.ndarray] = field(default_factory=list)
    identity: list[np.ndarray] = field(default_factory=list)  # index among all identities
    rows: int = 0

    def add(self, units: np.ndarray, similarity: np.ndarray, identity: np.ndarray) -> None:
        take = np.flatnonzero(np.isfinite(similarity))[: max(0, MARGIN_SAMPLE_ROWS - self.rows)]
        if len(take):
            self.units.append(units[take])
            self.similarity.append(similarity[take].astype(np.float64))
            self.identity.append(identity[take])
            self.rows += len(take)


def _candidates_schema(dimension: int) -> pa.Schema:
    """Images below the outlier similarity, written by `_judge_all` for the rival search."""
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("identity", pa.int64()),  # index among all identities
            ("similarity", pa.float32()),
            ("scored", pa.bool_()),
            ("below", pa.bool_()),  # below the outlier similarity (the others: `all_rivals`)
            ("embedding", pa.list_(pa.float32(), dimension)),  # unit length
        ]
    )


# `_judge_all`'s per-image results: identity_images.parquet less the rival columns (`_clear_by_margin`)
_JUDGED_SCHEMA = pa.schema([field for field in IDENTITY_IMAGES_SCHEMA if not field.name.startswith("rival_")])


def _judge_all(
    batches: Iterable[pa.RecordBatch],
    dimension: int,
    weigh: Weigh,
    thresholds: Thresholds,
    images_path: str,
    candidates_path: str,
    identities: int,
    all_rivals: bool = False,
) -> tuple[_PerIdentity, dict[str, int], _MarginStash]:
    """Pass over the work file: per-image results into `images_path`, the images below the outlier
    similarity (every usable image with `all_rivals`) into `candidates_path` (for `_clear_by_margin`),
    per-identity counts and centres, and the first usable images for the margin threshold."""
    per = _PerIdentity.empty(identities, dimension)
    totals = {"usable": 0, "outliers": 0, "duplicates": 0, "kept": 0}
    stash = _MarginStash()
    schema = _candidates_schema(dimension)
    with (
        pq.ParquetWriter(images_path, _JUDGED_SCHEMA, compression="zstd") as writer,
        pa.ipc.new_stream(candidates_path, schema) as candidates,
    ):
        for chunk in _whole_identities(batches, dimension, weigh):
            judged = judge(chunk.units, chunk.usable, chunk.weights, chunk.starts, thresholds.outlier)
            eligible = chunk.usable & ~judged.outlier
            duplicate = near_duplicates(
                chunk.units, chunk.quality, chunk.starts, eligible, thresholds.duplicate
            )
            ids = chunk.table.column("image_id").combine_chunks()
            is_duplicate = duplicate >= 0
            duplicate_of = ids.take(pa.array(np.maximum(duplicate, 0))).to_pylist()
            duplicate_of = pa.array(duplicate_of, pa.string(), mask=~is_duplicate)
            similarity = pa.array(judged.similarity, pa.float32(), mask=~np.isfinite(judged.similarity))
            quality = chunk.table.column("quality").cast(pa.float32())
            writer.write_table(
                pa.table(
                    [
                        ids,
                        chunk.table.column("identity").combine_chunks(),
                        quality.combine_chunks(),
                        similarity,
                        pa.array(judged.outlier),
                        duplicate_of,
                    ],
                    schema=_JUDGED_SCHEMA,
                )
            )
            ok = chunk.table.column("ok").to_numpy(zero_copy_only=False)
            scored = ok & chunk.table.column("quality").is_valid().to_numpy(zero_copy_only=False)
            identity = per.filled + group_of(chunk.starts, len(chunk.units))
            stash.add(chunk.units, judged.similarity, identity)
            below = np.flatnonzero(chunk.usable if all_rivals else judged.outlier)
            if len(below):
                candidates.write_table(
                    pa.table(
                        [
                            ids.take(pa.array(below)),
                            pa.array(identity[below]),
                            pa.array(judged.similarity[below]),
                            pa.array(scored[below]),
                            pa.array(judged.outlier[below]),
                            pa.FixedSizeListArray.from_arrays(
                                pa.array(chunk.units[below].ravel()), dimension
                            ),
                        ],
                        schema=schema,
                    )
                )
            kept = scored & ~judged.outlier & ~is_duplicate  # what select keeps with both identity rules
            flags = np.stack([np.ones(len(ok)), chunk.usable, judged.outlier, is_duplicate, kept], axis=1)
            span = slice(per.filled, per.filled + len(chunk.starts))
            per.counts[span] = np.add.reduceat(flags.astype(np.int64), chunk.starts, axis=0)
            per.names.append(chunk.table.column("identity").combine_chunks().take(pa.array(chunk.starts)))
            per.centres[span] = judged.centres
            per.has_centre[span] = np.add.reduceat(chunk.usable.astype(np.int64), chunk.starts) > 0
            per.filled = span.stop
            for name, values in (
                ("usable", chunk.usable),
                ("outliers", judged.outlier),
                ("duplicates", is_duplicate),
                ("kept", kept),
            ):
                totals[name] += int(values.sum())
    if per.filled != identities:  # DuckDB's distinct count and the sorted file disagree: never expected
        raise RuntimeError(f"{per.filled} identities in the work file, {identities} counted")
    return per, totals, stash


def _rival_thresholds(
    index: CentreIndex,
    centres: np.ndarray,
    position: np.ndarray,
    stash: _MarginStash,
    thresholds: Thresholds,
    margin: float | None,
) -> None:
    """Set `thresholds.margin` (`margin` when set, else halfway between the median margin of the stashed
    images under their own identity and under a random other one) and `thresholds.stranger` (the median
    similarity of the stashed images to a random other identity's centre), with their sources; both None
    (the rule off: the similarity alone decides) when no image can have a rival."""
    source = thresholds.source
    off = None
    if len(centres) < 2:
        off = "off: fewer than two identities have a centre, so no image has a rival"
    elif not stash.rows:
        off = "off: no image has a similarity to its identity's centre"
    if off is not None:
        thresholds.margin, thresholds.stranger = margin, None
        source["margin"] = "set" if margin is not None else off
        source["stranger"] = off
        return
    sample = margin_sample(
        index,
        centres,
        np.concatenate(stash.units),
        np.concatenate(stash.similarity),
        position[np.concatenate(stash.identity)],
        thresholds.merge,
        SEED,
    )
    thresholds.stranger = float(np.median(sample.stranger))
    source["stranger"] = (
        f"the median similarity of {len(sample.stranger)} images to a random other identity's centre: an "
        "image no nearer its own centre stays an outlier whatever its margin"
    )
    if margin is not None:
        thresholds.margin, source["margin"] = margin, "set"
    elif not len(sample.genuine) or not len(sample.impostor):
        thresholds.margin = None
        source["margin"] = "off: no sampled image has a rival (every centre near it is its own or a twin's)"
    else:
        genuine, impostor = float(np.median(sample.genuine)), float(np.median(sample.impostor))
        thresholds.margin = (genuine + impostor) / 2
        source["margin"] = (
            f"halfway between the median rival margin of {len(sample.genuine)} images filed under their own "
            f"identity ({genuine:.4f}) and filed under a random other one ({impostor:.4f})"
        )


_RIVALS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("outlier", pa.bool_()),
        IDENTITY_IMAGES_SCHEMA.field("rival_identity"),
        IDENTITY_IMAGES_SCHEMA.field("rival_similarity"),
    ]
)


def _clear_by_margin(
    index: CentreIndex,
    centres: np.ndarray,
    position: np.ndarray,
    with_centre: np.ndarray,
    names: pa.Array,
    candidates_path: str,
    thresholds: Thresholds,
    counts: np.ndarray,
    rivals_path: str,
) -> tuple[int, int, int]:
    """`_judge_all`'s candidates (the images below the outlier similarity, or every usable one), a batch at
    a time: each one's rival, and whether its margin clears it of being an outlier (then `counts`' outliers
    and kept are corrected). Writes image_id, outlier, rival_identity, rival_similarity to `rivals_path`;
    returns (images below the similarity, cleared, cleared and scored)."""
    below = cleared_total = cleared_scored = 0
    with pq.ParquetWriter(rivals_path, _RIVALS_SCHEMA, compression="zstd") as writer:
        for batch in _arrow_file(candidates_path):
            identity = batch.column("identity").to_numpy()
            similarity = batch.column("similarity").to_numpy(zero_copy_only=False).astype(np.float64)
            units = batch.column("embedding").flatten().to_numpy().reshape(batch.num_rows, -1)
            found = rivals(index, centres, units, position[identity], thresholds.merge)  # a lone centre: none
            rival, rival_similarity = found.index, found.similarity.astype(np.float64)
            has = rival >= 0
            margin = similarity - rival_similarity
            below_similarity = batch.column("below").to_numpy(zero_copy_only=False)
            cleared = np.zeros(batch.num_rows, dtype=bool)
            if thresholds.margin is not None:
                cleared = has & below_similarity & (margin >= thresholds.margin)
                if thresholds.stranger is not None:  # no nearer its own centre than to a stranger's
                    cleared &= similarity >= thresholds.stranger
            scored = batch.column("scored").to_numpy(zero_copy_only=False)
            np.subtract.at(counts[:, 2], identity[cleared], 1)  # outliers
            np.add.at(counts[:, 4], identity[cleared & scored], 1)  # kept
            below += int(below_similarity.sum())
            cleared_total += int(cleared.sum())
            cleared_scored += int((cleared & scored).sum())
            rival_name = pa.nulls(batch.num_rows, pa.string())
            if has.any():
                taken = names.take(pa.array(with_centre[np.maximum(rival, 0)])).to_pylist()
                rival_name = pa.array(taken, pa.string(), mask=~has)
            writer.write_table(
                pa.table(
                    [
                        batch.column("image_id"),
                        pa.array(below_similarity & ~cleared),
                        rival_name,
                        pa.array(rival_similarity.astype(np.float32), pa.float32(), mask=~has),
                    ],
                    schema=_RIVALS_SCHEMA,
                )
            )
    return below, cleared_total, cleared_scored


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far: its address space's high-water mark (VmHWM). Not
    `ru_maxrss`, which also holds the peak of the process it was forked from (a benchmark that built 2 GB of
    data before starting the command read its own 2 GB as the command's)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:  # not Linux
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def find_identities(
    output_url: str,
    *,
    embeddings: str | None = None,
    by: str = "quality",
    outlier_similarity: float | None = None,
    duplicate_similarity: float | None = None,
    merge_similarity: float | None = None,
    outlier_margin: float | None = None,
    all_rivals: bool = False,
    weighted: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    memory_limit: str | None = None,
) -> IdentitySummary:
    """Write OUTPUT/curation/identity_images.parquet, identities.parquet and identities.json. With
    `weighted` off every usable image counts the same in its centre (for comparison)."""
    import time

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    peak_mb: dict[str, float] = {}  # this process's peak RSS by the end of each stage
    memory_limit_bytes(memory_limit)  # bad options fail before anything is read
    for name, value in (
        ("outlier", outlier_similarity),
        ("duplicate", duplicate_similarity),
        ("merge", merge_similarity),
    ):
        if value is not None and not -1 <= value <= 1:
            raise UserError(f"--{name}-similarity must be a cosine similarity in [-1, 1], got {value}")
    if outlier_margin is not None and not -2 <= outlier_margin <= 2:
        raise UserError(
            f"--outlier-margin must be a difference of cosine similarities in [-2, 2], got {outlier_margin}"
        )
    storage = dict(storage_options or {})
    output = Output(output_url, storage)
    output.require_table(finished=True)
    with (
        tempfile.TemporaryDirectory(prefix="fiqa-identities-") as folder,
        connect(output, memory_limit=memory_limit) as connection,
    ):
        work = os.path.join(folder, "work")
        connection.execute(
            f"CREATE VIEW scores AS SELECT * FROM read_parquet({quote(files_pattern(output))})"
        )
        score = score_expression(connection, by)
        relation, source = _embedding_relation(connection, output, embeddings, storage)
        ranks = quality_ranks(connection, score) if weighted else None
        rows, without, count, dimension, parts = _write_work_files(
            connection, score, relation, source, work, memory_limit_bytes(memory_limit)
        )
        weigh: Weigh = ranks if ranks is not None else (lambda quality: np.ones(len(quality)))

        def batches() -> Iterator[pa.RecordBatch]:
            return _sorted_batches(connection, parts)

        def stage(name: str) -> None:
            seconds[name] = time.perf_counter() - started - sum(seconds.values())
            peak_mb[name] = _peak_rss_mb()

        stage("join_and_sort")
        thresholds = _thresholds(
            batches, dimension, weigh, outlier_similarity, duplicate_similarity, merge_similarity
        )
        stage("thresholds")
        unsorted = os.path.join(folder, "images-by-identity.parquet")
        candidates = os.path.join(folder, "below-similarity.arrows")
        per, totals, stash = _judge_all(
            batches(), dimension, weigh, thresholds, unsorted, candidates, count, all_rivals
        )
        shutil.rmtree(work)
        stage("judge")
        names = pa.concat_arrays(per.names) if per.names else pa.array([], pa.string())
        counts, has_centre = per.counts, per.has_centre
        with_centre = np.flatnonzero(has_centre)
        # every identity usually has a centre: then the array itself, not a copy, goes to the index
        centres = per.centres if len(with_centre) == len(has_centre) else per.centres[with_centre]
        per.centres = np.zeros((0, dimension), np.float32)
        index = CentreIndex(centres)
        neighbours = nearest_in(index, centres)
        nearest = np.full(len(names), -1, dtype=np.int64)
        found = neighbours.index >= 0
        nearest[with_centre[found]] = with_centre[neighbours.index[found]]
        nearest_similarity = np.full(len(names), np.nan, dtype=np.float32)
        nearest_similarity[with_centre] = neighbours.similarity
        stage("nearest")
        position = np.full(len(names), -1, dtype=np.int64)  # an identity's row among the centres
        position[with_centre] = np.arange(len(with_centre))
        _rival_thresholds(index, centres, position, stash, thresholds, outlier_margin)
        rivals_path = os.path.join(folder, "rivals.parquet")
        below, cleared, cleared_scored = _clear_by_margin(
            index, centres, position, with_centre, names, candidates, thresholds, counts, rivals_path
        )
        totals["outliers"] -= cleared
        totals["kept"] += cleared_scored
        del index, centres, stash
        stage("rivals")
        has_nearest = nearest >= 0
        merge = has_nearest & (np.nan_to_num(nearest_similarity, nan=-2) >= thresholds.merge)
        by_name = pa.table(
            [
                names,
                *(pa.array(counts[:, k]) for k in range(5)),
                pa.array(
                    names.take(pa.array(np.maximum(nearest, 0))).to_pylist(), pa.string(), mask=~has_nearest
                ),
                pa.array(nearest_similarity, pa.float32(), mask=~has_nearest),
                pa.array(merge),
            ],
            schema=IDENTITIES_SCHEMA,
        ).sort_by("identity")  # the partitions came in hash order
        identities_path = os.path.join(folder, "identities.parquet")
        pq.write_table(by_name, identities_path, compression="zstd")
        images_path = os.path.join(folder, "identity_images.parquet")
        # DuckDB sorts (spilling under the memory limit); pyarrow writes, so that the file's schema is
        # the contract's whatever the data (DuckDB would mark columns without nulls "not null")
        with pq.ParquetWriter(images_path, IDENTITY_IMAGES_SCHEMA, compression="zstd") as writer:
            sorted_rows = connection.sql(
                "SELECT i.image_id, i.identity, i.quality, i.similarity, coalesce(r.outlier, i.outlier) AS "
                "outlier, i.duplicate_of, r.rival_identity, r.rival_similarity "
                f"FROM read_parquet({quote(unsorted)}) i LEFT JOIN read_parquet({quote(rivals_path)}) r "
                "ON i.image_id = r.image_id ORDER BY i.image_id"
            )
            for batch in sorted_rows.to_arrow_reader(CHUNK_ROWS):
                writer.write_table(pa.Table.from_batches([batch]).cast(IDENTITY_IMAGES_SCHEMA))
        output.commit_file(IDENTITY_IMAGES_FILE, images_path)
        output.commit_file(IDENTITIES_FILE, identities_path)
        stage("write")
    summary = IdentitySummary(
        output=output.full_url("curation"),
        table=output.table_fingerprint(),
        embeddings=source,
        by=by,
        weighted=weighted,
        images=rows,
        without_identity=without,
        usable=totals["usable"],
        identities=len(names),
        outliers=totals["outliers"],
        duplicates=totals["duplicates"],
        kept=totals["kept"],
        merge_candidates=int(merge.sum()),
        thresholds=thresholds,
        below_similarity=below,
        nearest_method=neighbours.method,
        work_partitions=len(parts),
        seconds={name: round(value, 3) for name, value in seconds.items()},
        peak_rss_mb=peak_mb,
    )
    output.commit_bytes(IDENTITY_SUMMARY_FILE, json.dumps(asdict(summary), indent=1).encode())
    return summary
