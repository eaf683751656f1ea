"""Input discovery: what `fiqa score INPUT` means, turned into a sorted list of items to score.

INPUT is any fsspec URL (local path, s3://...):
- a folder/prefix: image files found recursively by extension (hidden files and folders ignored), plus
  the images inside any WebDataset `.tar` shards found there;
- a manifest: a `.csv` or `.parquet` file with a `uri` column and optional `image_id`, `identity`, `size`,
  `version` (the last two let `--since` recognise unchanged images)
  (relative URIs are resolved against the manifest's folder);
- one WebDataset `.tar` shard.

`image_id` is stable: the '/'-separated path relative to INPUT, the manifest's id, or tar path + member key.
"""

from __future__ import annotations

import csv
import io
import posixpath
import tarfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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


def discover(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, list[InputItem]]:
    """(kind, items sorted by image_id) for INPUT; raises InputError when it cannot be listed."""
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
        kind, items = "folder", _list_folder(fs, root)
    elif _extension(root) in (".csv", ".parquet"):
        kind, items = "manifest", _read_manifest(fs, root)
    elif _extension(root) == ".tar":
        kind, items = "webdataset", _list_tar(fs, root, posixpath.basename(root))
    else:
        raise InputError(f"INPUT must be a folder, a .csv/.parquet manifest or a .tar shard: {url}")
    items.sort(key=lambda item: item.image_id)
    duplicates = [image_id for image_id, n in Counter(i.image_id for i in items).items() if n > 1]
    if duplicates:
        raise InputError(f"{len(duplicates)} image_id values occur more than once, e.g. {duplicates[:5]}")
    return kind, items


def _list_folder(fs: Any, root: str) -> list[InputItem]:
    try:
        found = with_retries(lambda: fs.find(root, detail=True))
    except Exception as error:
        raise InputError(f"cannot list INPUT {root}: {type(error).__name__}: {error}") from error
    items: list[InputItem] = []
    for path, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        relative = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
        if _is_hidden(relative):
            continue
        extension = _extension(relative)
        if extension in IMAGE_EXTENSIONS:
            full = _full_url(fs, path)
            items.append(
                InputItem(relative, full, full, size=int(info.get("size") or -1), version=_version(info))
            )
        elif extension == ".tar":
            items.extend(_list_tar(fs, path, relative))
    return items


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


def _read_manifest(fs: Any, path: str) -> list[InputItem]:
    try:
        data = with_retries(lambda: fs.cat_file(path))
        if _extension(path) == ".parquet":
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        else:
            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    except Exception as error:
        raise InputError(f"cannot read manifest {path}: {type(error).__name__}: {error}") from error
    if rows and "uri" not in rows[0]:
        raise InputError(f"manifest {path} has no `uri` column (columns: {', '.join(rows[0])})")
    base = posixpath.dirname(path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    items = []
    for number, row in enumerate(rows, start=1):
        uri = str(row.get("uri") or "").strip()
        if not uri:
            raise InputError(f"manifest {path}, row {number}: empty `uri`")
        if "://" not in uri and not uri.startswith("/"):
            # relative to the manifest's folder; normalised, since object stores take "./" and "../" literally
            uri = _full_url(fs, posixpath.normpath(posixpath.join(base, uri)))
        elif "://" not in uri and protocol not in ("file", "local"):
            uri = f"{protocol}://{uri.lstrip('/')}"
        raw_id = row.get("image_id")
        image_id = (str(raw_id).strip() if raw_id is not None else "") or str(row["uri"]).strip()
        identity = row.get("identity")
        # optional `size` and `version` (an ETag, mtime or content hash the producer knows): with them,
        # `fiqa score --since` can tell an unchanged image without touching the store
        version = row.get("version")
        size = row.get("size")
        try:
            size = int(size) if size not in (None, "") else -1
        except ValueError as error:
            raise InputError(f"manifest {path}, row {number}: `size` is not an integer: {size!r}") from error
        items.append(
            InputItem(
                image_id,
                uri,
                uri,
                identity=None if identity in (None, "") else str(identity),
                size=size,
                version="" if version in (None, "") else str(version),
            )
        )
    return items
