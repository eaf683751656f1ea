"""Input discovery: what `fiqa score INPUT` means, turned into the items to score (`listing_parts`:
Arrow tables in no order, for a run to spill and sort on disk, `flows.listing_sort`; `discover`: one
sorted table in memory).

INPUT is any fsspec URL (local path, s3://...):
- a folder/prefix: image files found recursively by extension (hidden files and folders ignored), plus
  the images inside any WebDataset `.tar` shards found there;
- a manifest: a `.csv` or `.parquet` file with a `uri` column and optional `image_id`, `identity`, `size`,
  `version` (the last two let `--since` recognise unchanged images)
  (relative URIs are resolved against the manifest's folder);
- one WebDataset `.tar` shard.

The members of WebDataset shards are enumerated by a `TarLister`: here one after another
(`list_tars_in_process`); the scoring flow hands in one that lists a big input's in Ray tasks, so that
the driver reads none of their bytes, and reuses the saved listing of unchanged ones (`flows.tar_listing`).

`image_id` is stable: the '/'-separated path relative to INPUT, the manifest's id, or tar path + member key.

No listing sits whole in memory: a folder goes a batch of objects at a time (on S3 one page of
`list_objects_v2` after another, each page retried on its own; elsewhere a directory at a time,
`fs.walk`), a manifest a batch of rows at a time and tar shards a shard at a time.
"""

from __future__ import annotations

import csv
import io
import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.asyn import sync

from fiqa_curator.schemas.errors import UserError
from fiqa_curator.workers.io import filesystem, with_retries

# Formats we decode, plus image formats people keep next to them: those get an `unsupported_format`
# row instead of vanishing from the table.
DECODABLE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
OTHER_IMAGE_EXTENSIONS = (
    ".heic",
    ".heif",
    ".avif",
    ".jp2",
    ".jxl",
    ".ico",
    ".ppm",
    ".pgm",
    ".pbm",
    ".tga",
    ".svg",
)
IMAGE_EXTENSIONS = DECODABLE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS
IDENTITY_EXTENSIONS = ("cls", "id", "identity")
MAX_IDENTITY_BYTES = 1024
# A folder's images go on as tables of this many (the store's pages are 1,000 objects): big enough that a
# table's overhead is nothing, small enough that a corpus's listing never gathers in memory.
FOLDER_BATCH_ROWS = 1 << 16
S3_PAGE_KEYS = 1000  # keys per `list_objects_v2` page: the most S3 gives


class InputError(UserError):
    """INPUT cannot be listed or read as a dataset: the job cannot run."""


@dataclass(frozen=True)
class InputItem:
    """One image to score. offset/length >= 0 mean a byte range of `url` (a tar member)."""

    image_id: str
    source: str
    url: str
    offset: int = -1
    length: int = -1
    identity: str | None = None
    size: int = -1
    version: str = ""  # ETag or mtime when the store reports one

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ITEM_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("identity", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
    ]
)


@dataclass(frozen=True)
class TarShard:
    """A WebDataset shard to enumerate: its URL, the id prefix of its images (its path relative to INPUT, or
    its name when INPUT is the shard), its size in bytes (-1 when unknown) and its version (ETag or mtime,
    "" when the store reports none)."""

    url: str
    tar_id: str
    size: int = -1
    version: str = ""


# Lists the members of the shards given: tables (ITEM_SCHEMA) holding every member of each, in any order.
TarLister = Callable[[Sequence[TarShard], Mapping[str, Any] | None], Iterable[pa.Table]]


def items_to_table(items: list[InputItem]) -> pa.Table:
    # column by column: a dict per item (`dataclasses.asdict`) cost ~4x as much at a million items
    return pa.table(
        {name: [getattr(item, name) for item in items] for name in ITEM_SCHEMA.names}, ITEM_SCHEMA
    )


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _extension(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


def _version(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def _full_url(fs: Any, path: str) -> str:
    return fs.unstrip_protocol(path)


def in_id_order(items: pa.Table) -> pa.Table:
    """`items` sorted by image_id, in one chunk; sorted only when out of order (a manifest comes sorted, a
    folder's listing mostly), so that an ordered table keeps its buffers instead of being copied."""
    ids = items.column("image_id")
    in_order = pc.all(pc.less_equal(ids.slice(0, max(0, len(ids) - 1)), ids.slice(1))).as_py()
    return (items.sort_by("image_id") if in_order is False else items).combine_chunks()


def check_input_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """InputError when INPUT plainly does not exist: checked in a blink before a run starts anything
    (`listing_parts` checks again, with retries, and lists it). A storage that does not answer now is left
    to `listing_parts`, which retries and reports it."""
    try:
        fs, root = filesystem(url, storage_options)
        root = root.rstrip("/") or root
        exists = fs.exists(root) or fs.isdir(root)  # not isdir first: on S3 it lists the whole folder
    except Exception:
        return
    if not exists:
        raise InputError(f"INPUT does not exist: {url}")


def listing_parts(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    list_tars: TarLister | None = None,
) -> tuple[str, Iterator[pa.Table]]:
    """(kind, INPUT's items as tables with ITEM_SCHEMA, in no particular order): a manifest a batch of
    rows at a time, WebDataset shards a shard (or a few) at a time as `list_tars` (default: in this
    process) gives them, so that a caller can spill them instead of holding the whole listing. Raises
    InputError when INPUT cannot be listed (now, or while the parts are read)."""
    try:
        fs, root = filesystem(url, storage_options)
    except Exception as error:
        raise InputError(f"cannot open INPUT {url}: {type(error).__name__}: {error}") from error
    root = root.rstrip("/") or root
    try:
        is_dir = with_retries(lambda: fs.isdir(root))
        exists = is_dir or with_retries(lambda: fs.exists(root))
    except Exception as error:
        raise InputError(f"cannot read INPUT {url}: {type(error).__name__}: {error}") from error
    if not exists:
        raise InputError(f"INPUT does not exist: {url}")
    if is_dir:
        return "folder", _folder_parts(fs, root, storage_options, list_tars)
    if _extension(root) in (".csv", ".parquet"):
        return "manifest", _manifest_parts(fs, root)
    if _extension(root) == ".tar":
        return "webdataset", _parts([], [_tar_shard(fs, root)], storage_options, list_tars)
    raise InputError(f"INPUT must be a folder, a .csv/.parquet manifest or a .tar shard: {url}")


def _parts(
    tables: list[pa.Table],
    tars: Sequence[TarShard],
    storage_options: Mapping[str, Any] | None,
    list_tars: TarLister | None,
) -> Iterator[pa.Table]:
    yield from tables
    if tars:
        yield from (list_tars or list_tars_in_process)(tars, storage_options)


def discover(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    list_tars: TarLister | None = None,
) -> tuple[str, pa.Table]:
    """(kind, the items as one table with ITEM_SCHEMA, sorted by image_id) for INPUT, in memory (a run
    spills and sorts them on disk instead: `flows.listing_sort`); raises InputError when it cannot be
    listed or an image_id repeats."""
    kind, parts = listing_parts(url, storage_options, list_tars)
    items = in_id_order(pa.concat_tables([items_to_table([]), *parts]))
    ids = items.column("image_id")
    repeated = ids.slice(1).filter(pc.equal(ids.slice(1), ids.slice(0, max(0, len(ids) - 1))))
    if len(repeated):
        raise duplicate_ids(pc.unique(repeated).to_pylist(), len(pc.unique(repeated)))
    return kind, items


def duplicate_ids(examples: Sequence[str], count: int) -> InputError:
    """The error for a listing whose image ids repeat (`count` of them, `examples` the first few)."""
    return InputError(f"{count} image_id values occur more than once, e.g. {list(examples[:5])}")


def _tar_shard(fs: Any, path: str) -> TarShard:
    """INPUT as one shard, with its size and version when the store tells them."""
    try:
        info = with_retries(lambda: fs.info(path))
    except Exception:  # hints only (where to list it, whether a saved listing holds it): reading it tells
        info = {}
    return TarShard(
        _full_url(fs, path), posixpath.basename(path), int(info.get("size") or -1), _version(info)
    )


def _folder_parts(
    fs: Any,
    root: str,
    storage_options: Mapping[str, Any] | None,
    list_tars: TarLister | None,
) -> Iterator[pa.Table]:
    """The image files under `root` as tables of at most FOLDER_BATCH_ROWS items (at least one table, maybe
    empty), then the members of the WebDataset shards found there (kept aside meanwhile: a shard is a file
    of thousands of images, so there are few)."""
    items: list[InputItem] = []
    tars: list[TarShard] = []
    for info in _folder_objects(fs, root):
        path = info["name"]
        relative = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        if _is_hidden(relative):
            continue
        extension = _extension(relative)
        size = int(info.get("size") or -1)
        if extension in IMAGE_EXTENSIONS:
            full = _full_url(fs, path)
            items.append(InputItem(relative, full, full, size=size, version=_version(info)))
            if len(items) == FOLDER_BATCH_ROWS:
                yield items_to_table(items)
                items = []
        elif extension == ".tar":
            tars.append(TarShard(_full_url(fs, path), relative, size, _version(info)))
    yield items_to_table(items)
    tars.sort(key=lambda shard: shard.tar_id)  # listed in no particular order: the shards go in by name
    yield from _parts([], tars, storage_options, list_tars)


def _folder_objects(fs: Any, root: str) -> Iterator[Mapping[str, Any]]:
    """The files under `root` as fsspec info dicts (`name`, `size`, ETag or mtime), in no particular order,
    never all in memory at once; raises InputError when the store cannot list them."""
    try:
        if _is_s3(fs):
            yield from _s3_objects(fs, root)
            return
        # a directory at a time, each listing retried on its own: what is in memory is the largest
        # directory's listing and the folders still to visit (fsspec's `walk`, with retries)
        folders = [root]
        while folders:
            folder = folders.pop()
            for info in with_retries(partial(fs.ls, folder, detail=True)):
                name = info["name"].rstrip("/")
                if info.get("type") != "directory":
                    yield info
                elif name != folder.rstrip("/") and not posixpath.basename(name).startswith("."):
                    folders.append(name)  # a hidden folder's files would all be left out: not visited
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot list INPUT {root}: {type(error).__name__}: {error}") from error


def _is_s3(fs: Any) -> bool:
    # s3fs's own `find` gathers every object of the prefix (a dict per object, ~1 KB each) before returning
    return "s3" in fs.protocol and hasattr(fs, "_call_s3") and not getattr(fs, "version_aware", False)


def _s3_objects(fs: Any, root: str) -> Iterator[Mapping[str, Any]]:
    """Every object under `root` on S3, one `list_objects_v2` page (1,000 keys) at a time; a page that fails
    is asked for again (`with_retries`) from the same continuation token, so a transient error costs one
    page, not the listing. The info dicts have the keys s3fs's `find` gives (name, size, ETag)."""
    bucket, key, _ = fs.split_path(root)
    prefix = f"{key.rstrip('/')}/" if key else ""
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE_KEYS, **fs.req_kw}
    while True:
        page = with_retries(lambda: sync(fs.loop, fs._call_s3, "list_objects_v2", **request))
        for entry in page.get("Contents", []):
            if not entry["Key"].endswith("/"):  # a "folder" marker object some tools write
                yield {**entry, "name": f"{bucket}/{entry['Key']}", "size": entry["Size"], "type": "file"}
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def list_tars_in_process(
    tars: Sequence[TarShard], storage_options: Mapping[str, Any] | None = None
) -> Iterable[pa.Table]:
    """The default TarLister: each shard read here, one after another."""
    for shard in tars:
        yield list_tar_members(shard, storage_options)


def list_tar_members(shard: TarShard, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """A shard's images as items (ITEM_SCHEMA): what a TarLister runs for each shard, wherever it runs."""
    fs, path = filesystem(shard.url, storage_options)
    return items_to_table(_list_tar(fs, path, shard.tar_id))


def _list_tar(fs: Any, path: str, tar_id: str) -> list[InputItem]:
    """Members of a WebDataset shard: `key.ext` files; image members become items, `key.cls`/`key.id` give
    identities. Byte offsets come from the tar headers, so scoring reads each member with one range."""
    full = _full_url(fs, path)
    images: list[tuple[str, str, tarfile.TarInfo]] = []
    identities: dict[str, str] = {}
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                name = posixpath.normpath(member.name).lstrip("/")  # `tar -C dir .` writes "./x.jpg"
                if not member.isfile() or _is_hidden(name) or name.startswith(".."):
                    continue
                directory, base = posixpath.split(name)
                stem, _, extension = base.partition(".")  # WebDataset: the key ends at the first dot
                key = posixpath.join(directory, stem)
                if extension.lower() in IDENTITY_EXTENSIONS and member.size <= MAX_IDENTITY_BYTES:
                    data = archive.extractfile(member)
                    identities[key] = data.read().decode("utf-8", "replace").strip() if data else ""
                elif "." + extension.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    images.append((key, extension, member))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InputError(f"cannot read tar shard {full}: {type(error).__name__}: {error}") from error
    per_key = Counter(key for key, _, _ in images)
    items = []
    for key, extension, member in images:
        suffix = key if per_key[key] == 1 else f"{key}.{extension}"
        items.append(
            InputItem(
                image_id=f"{tar_id}/{suffix}",
                source=f"{full}#{member.name}",
                url=full,
                offset=member.offset_data,
                length=member.size,
                identity=identities.get(key),
                size=member.size,
            )
        )
    return items


MANIFEST_CHUNK = 100_000  # rows whose relative URIs are resolved at a time (Python strings for those only)


MANIFEST_BATCH_ROWS = 1 << 18  # Parquet manifest rows read, checked and resolved at a time
MANIFEST_CSV_BLOCK_BYTES = 16 << 20  # the same for a CSV manifest, in bytes (about 100,000 rows)


def _manifest_parts(fs: Any, path: str) -> Iterator[pa.Table]:
    """A manifest's rows as items (ITEM_SCHEMA, in the manifest's order), MANIFEST_BATCH_ROWS at a time:
    a CSV's cells stay strings (an id "007" is not a number), a Parquet manifest's columns are cast to
    strings where needed."""
    first_row = 0
    for table in _manifest_tables(fs, path):
        if table.num_rows:
            yield _manifest_items(fs, path, table, first_row)
            first_row += table.num_rows


def _manifest_tables(fs: Any, path: str) -> Iterator[pa.Table]:
    """The manifest's raw rows, a batch at a time (InputError when it cannot be read)."""
    try:
        with with_retries(lambda: fs.open(path, "rb")) as handle:
            if _extension(path) == ".parquet":
                batches: Iterable[pa.RecordBatch] = pq.ParquetFile(handle).iter_batches(
                    batch_size=MANIFEST_BATCH_ROWS
                )
            else:
                head = handle.read(65536)
                header = next(csv.reader(io.StringIO(head.decode("utf-8-sig", "replace"))), [])
                handle.seek(0)
                batches = pa_csv.open_csv(
                    handle,
                    read_options=pa_csv.ReadOptions(block_size=MANIFEST_CSV_BLOCK_BYTES),
                    parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                    convert_options=pa_csv.ConvertOptions(
                        column_types=dict.fromkeys(header, pa.string()), strings_can_be_null=False
                    ),
                )
            for batch in batches:
                yield pa.Table.from_batches([batch])
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot read manifest {path}: {type(error).__name__}: {error}") from error


def _manifest_items(fs: Any, path: str, table: pa.Table, first_row: int) -> pa.Table:
    """Manifest rows (from row `first_row`, counted from 0) as items, column by column in Arrow."""
    if "uri" not in table.column_names:
        raise InputError(f"manifest {path} has no `uri` column (columns: {', '.join(table.column_names)})")
    count = table.num_rows
    given = pc.utf8_trim_whitespace(pc.fill_null(_strings(table, "uri"), ""))
    empty = pc.equal(given, "").to_numpy(zero_copy_only=False)
    if empty.any():
        raise InputError(f"manifest {path}, row {first_row + int(np.argmax(empty)) + 1}: empty `uri`")
    uri = _resolve_uris(fs, path, given)
    raw_id = _strings(table, "image_id")
    image_id = given
    if raw_id is not None:
        raw_id = pc.utf8_trim_whitespace(pc.fill_null(raw_id, ""))
        image_id = pc.if_else(pc.equal(raw_id, ""), given, raw_id)
    identity = _strings(table, "identity")
    identity = (
        pa.nulls(count, pa.string())
        if identity is None
        else pc.if_else(pc.equal(identity, ""), pa.scalar(None, pa.string()), identity)
    )
    # optional `size` and `version` (an ETag, mtime or content hash the producer knows): with them,
    # `fiqa score --since` can tell an unchanged image without touching the store
    version = _strings(table, "version")
    version = pa.repeat(pa.scalar(""), count) if version is None else pc.fill_null(version, "")
    return pa.table(
        {
            "image_id": image_id,
            "source": uri,
            "url": uri,
            "offset": pa.repeat(pa.scalar(-1, pa.int64()), count),
            "length": pa.repeat(pa.scalar(-1, pa.int64()), count),
            "identity": identity,
            "size": _manifest_sizes(path, table, first_row),
            "version": version,
        },
        schema=ITEM_SCHEMA,
    )


def _strings(table: pa.Table, name: str) -> pa.Array | None:
    """A manifest's column as strings (None when the manifest has no such column)."""
    if name not in table.column_names:
        return None
    return pc.cast(table.column(name).combine_chunks(), pa.string())


def _resolve_uris(fs: Any, path: str, given: pa.Array) -> pa.Array:
    """Relative URIs against the manifest's folder, normalised (object stores take "./" and "../"
    literally); a bare absolute path gets the manifest's protocol on an object store."""
    base = posixpath.dirname(path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    has_scheme = pc.match_substring(given, "://")
    relative = pc.and_(pc.invert(has_scheme), pc.invert(pc.starts_with(given, "/")))
    parts = []
    for start in range(0, len(given), MANIFEST_CHUNK):
        chunk, which = given.slice(start, MANIFEST_CHUNK), relative.slice(start, MANIFEST_CHUNK)
        if pc.any(which).as_py():
            resolved = [
                _full_url(fs, posixpath.normpath(posixpath.join(base, uri)))
                for uri in chunk.filter(which).to_pylist()
            ]
            chunk = pc.replace_with_mask(chunk, which, pa.array(resolved, pa.string()))
        parts.append(chunk)
    uri = pa.concat_arrays(parts)
    if protocol not in ("file", "local"):
        bare = pc.and_(pc.invert(has_scheme), pc.invert(relative))
        prefixed = pc.binary_join_element_wise(f"{protocol}://", pc.utf8_ltrim(uri, "/"), "")
        uri = pc.if_else(bare, prefixed, uri)
    return uri


def _manifest_sizes(path: str, table: pa.Table, first_row: int = 0) -> pa.Array:
    """The optional `size` column as int64, -1 where absent or empty."""
    if "size" not in table.column_names:
        return pa.repeat(pa.scalar(-1, pa.int64()), table.num_rows)
    column = table.column("size").combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.utf8_trim_whitespace(column)
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
    try:
        return pc.fill_null(pc.cast(column, pa.int64()), -1)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for number, value in enumerate(column.to_pylist(), start=first_row + 1):
            try:
                int(value) if value is not None else None
            except (TypeError, ValueError):
                raise InputError(
                    f"manifest {path}, row {number}: `size` is not an integer: {value!r}"
                ) from None
        raise InputError(f"manifest {path}: `size` is not an integer column ({column.type})") from None
