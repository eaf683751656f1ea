"""The reading stage that runs as light Ray tasks: bytes in, decoded 112x112 RGB faces out.

`read_and_decode` reads each item's bytes (a whole file or a byte range of a tar shard) with retries and
decodes it; every failure becomes a status and a reason. It imports no torch: a fresh Ray worker that runs
it starts in a fraction of a second.

With `align` ("largest" or "all") items are raw photographs: each is decoded at full size, faces are
detected and warped to the ArcFace template (`workers.align`). An item then yields one row per face
("all"; image ids `ID#face0`, `ID#face1`, ... largest first), its largest face ("largest"; the image id
unchanged), or one `no_face` row. Every row carries `item_id` and `item_rows` (how many rows its item
yields) so that the writer knows when an item, and so a shard, is complete.

With `defer_jpeg` (aligned crops only; `fiqa score --decode device`) plain JPEG crops are not decoded
here and the batch has no `pixels` column: each row's input travels as bytes in `encoded`, the JPEG
itself when `jpeg` is true (the scoring actor decodes it on its device, `workers.device_decode`), else
the pixels decoded here (empty when there are none). A 112x112 face is 4-5 KB as JPEG and 37 KB as
pixels: the object store and the bus carry 8x less.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fiqa_curator.schemas.batch import ENCODED, JPEG, PIXELS, READ_COLUMNS, READ_LOCATION, face_image_id
from fiqa_curator.schemas.status import Status
from fiqa_curator.workers.io import protocol_of, read_range
from fiqa_curator.workers.preprocess import decode_face, decode_image, plain_jpeg
from fiqa_curator.workers.settings import ALIGN_MODES, DEFAULT_MAX_PIXELS

READ_THREADS = 16  # object stores reward many requests in flight; local disks do not mind
# Members of one tar shard in a batch are read with one request per span instead of one per member: a
# 4 KB face per GET would cap a reading task at the store's request rate. Gaps (tar headers, padding,
# members planned elsewhere) up to MAX_GAP are read and dropped; a span stops at MAX_SPAN bytes.
MAX_GAP = 1 << 20
MAX_SPAN = 64 << 20
_NULL = {name: column.null for name, column in READ_COLUMNS.items()}  # the batch contract's placeholders


@dataclass
class FaceRow:
    """One output row of an item (several for an item with several faces): what the model is given
    (`pixels`, or `encoded` for the scoring device) and the decode and face columns; unset fields are null."""

    status: str
    error: str = _NULL["error"]
    pixels: np.ndarray | None = None
    width: int = _NULL["width"]
    height: int = _NULL["height"]
    resized: bool = _NULL["resized"]
    face_index: int = _NULL["face_index"]
    faces: int = _NULL["faces"]
    face_box: tuple[float, ...] = field(default=(_NULL["face_box"],) * READ_COLUMNS["face_box"].width)
    face_confidence: float = _NULL["face_confidence"]
    encoded: bytes = ENCODED.null  # left for the scoring device to decode


def _read_span(
    url: str,
    ranges: list[tuple[int, int]],
    storage_options: Mapping[str, Any] | None,
) -> list[tuple[bytes | None, str]]:
    """The bytes of each (offset, length) of `url` (offset -1: the whole file), read in one request; a
    failed read is every range's (None, reason)."""
    start = ranges[0][0]
    end = max(offset + length for offset, length in ranges)
    try:
        data = read_range(url, start, end - start if start >= 0 else -1, storage_options)
    except Exception as error:
        return [(None, f"{type(error).__name__}: {error}")] * len(ranges)
    if start < 0:
        return [(data, "")]
    return [(data[offset - start : offset - start + length], "") for offset, length in ranges]


def _spans(urls: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """Item indices grouped into reads: each whole file alone; byte ranges of one URL joined in offset
    order while the gap to the next stays under MAX_GAP and the span under MAX_SPAN."""
    spans: list[list[int]] = []
    by_url: dict[str, list[int]] = {}
    for index, (url, offset) in enumerate(zip(urls, offsets, strict=True)):
        if int(offset) < 0:
            spans.append([index])
        else:
            by_url.setdefault(str(url), []).append(index)
    for indices in by_url.values():
        indices.sort(key=lambda i: int(offsets[i]))
        span, start, end = (
            [indices[0]],
            int(offsets[indices[0]]),
            int(offsets[indices[0]] + lengths[indices[0]]),
        )
        for index in indices[1:]:
            offset, stop = int(offsets[index]), int(offsets[index] + lengths[index])
            if offset - end <= MAX_GAP and max(end, stop) - start <= MAX_SPAN:
                span.append(index)
                end = max(end, stop)
            else:
                spans.append(span)
                span, start, end = [index], offset, stop
        spans.append(span)
    return spans


def decode_rows(
    data: bytes,
    img_size: int = 112,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    align: str | None = None,
    defer_jpeg: bool = False,
) -> list[FaceRow]:
    """An item's bytes -> its rows: the face crop(s) the model scores, or why there are none. The one place
    that turns bytes into model input; the report's thumbnails come from it too (with the run's settings),
    so they show exactly what was scored."""
    if align is None and defer_jpeg and plain_jpeg(data, size=img_size):
        return [FaceRow(Status.OK, pixels=None, width=img_size, height=img_size, encoded=data)]
    if align is None:
        decoded = decode_face(data, size=img_size, max_pixels=max_pixels)
        return [
            FaceRow(
                decoded.status,
                decoded.error or _NULL["error"],
                decoded.image,
                decoded.width or _NULL["width"],
                decoded.height or _NULL["height"],
                decoded.resized,
            )
        ]
    from fiqa_curator.workers.align import detect_faces, warp_to_template

    decoded = decode_image(data, max_pixels=max_pixels)
    size = (decoded.width or _NULL["width"], decoded.height or _NULL["height"])
    if not decoded.ok:
        return [FaceRow(decoded.status, decoded.error or _NULL["error"], None, *size)]
    try:
        faces = detect_faces(decoded.image)
        chosen = faces if align == "all" else faces[:1]
        crops = [warp_to_template(decoded.image, face.landmarks, img_size) for face in chosen]
    except Exception as error:  # a detector failure on one image is that image's row, not the job's end
        return [
            FaceRow(
                Status.DECODE_ERROR, f"face alignment failed: {type(error).__name__}: {error}", None, *size
            )
        ]
    if not faces:
        return [FaceRow(Status.NO_FACE, "no face found by the detector", None, *size, faces=0)]
    return [
        FaceRow(
            Status.OK,
            _NULL["error"],
            crop,
            *size,
            resized=True,
            face_index=index,
            faces=len(faces),
            face_box=tuple(float(v) for v in face.box),
            face_confidence=face.confidence,
        )
        for index, (face, crop) in enumerate(zip(chosen, crops, strict=True))
    ]


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    storage_options: Mapping[str, Any] | None = None,
    options_protocol: str | None = None,
    img_size: int = 112,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    align: str | None = None,
    defer_jpeg: bool = False,
) -> dict[str, np.ndarray]:
    """Items (image_id, url, offset, length, ...) -> rows with pixels and decode (and face) results."""
    if align is not None and align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES} or None, got {align!r}")
    if align is not None and defer_jpeg:
        raise ValueError("defer_jpeg is for aligned crops: raw photos are decoded where faces are detected")
    count = len(batch["image_id"])
    urls, offsets, lengths = (
        np.asarray(batch["url"]),
        np.asarray(batch["offset"]),
        np.asarray(batch["length"]),
    )
    spans = _spans(urls, offsets, lengths)

    def read(span: list[int]) -> list[tuple[bytes | None, str]]:
        url = str(urls[span[0]])
        # Options (credentials) go only to URLs of the store they were given for: a manifest may also name
        # https:// or other stores, which must not receive them.
        options = storage_options if protocol_of(url) == options_protocol else None
        return _read_span(url, [(int(offsets[i]), int(lengths[i])) for i in span], options)

    reads: list[tuple[bytes | None, str]] = [(None, "")] * count
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(spans)))) as pool:
        for span, results in zip(spans, pool.map(read, spans), strict=True):
            for index, result in zip(span, results, strict=True):
                reads[index] = result
    passthrough = [key for key in batch if key not in READ_LOCATION]
    rows: list[tuple[int, FaceRow]] = []
    byte_sizes: list[int] = []
    for index, (data, read_error) in enumerate(reads):
        item_rows = (
            [FaceRow(Status.READ_ERROR, read_error)]
            if data is None
            else decode_rows(data, img_size, max_pixels, align, defer_jpeg)
        )
        rows.extend((index, row) for row in item_rows)
        byte_sizes.append(_NULL["byte_size"] if data is None else len(data))
    total = len(rows)
    owner = np.array([i for i, _ in rows], dtype=np.int64)  # the item each row comes from
    out: dict[str, np.ndarray] = {key: np.asarray(batch[key])[owner] for key in passthrough}
    out["item_id"] = np.asarray(batch["image_id"])[owner]
    out["item_rows"] = np.bincount(owner, minlength=count)[owner].astype(READ_COLUMNS["item_rows"].dtype)
    if align == "all":  # one row per face: each needs its own id; items without a face keep theirs
        out["image_id"] = np.array(
            [
                face_image_id(batch["image_id"][i], row.face_index)
                if row.face_index >= 0
                else str(batch["image_id"][i])
                for i, row in rows
            ],
            dtype=object,
        )
    if defer_jpeg:
        out[ENCODED.name] = np.array(
            [
                row.encoded or (ENCODED.null if row.pixels is None else row.pixels.tobytes())
                for _, row in rows
            ],
            dtype=ENCODED.dtype,
        )
        out[JPEG.name] = np.array([bool(row.encoded) for _, row in rows], dtype=JPEG.dtype)
    else:
        out[PIXELS] = np.zeros((total, img_size, img_size, 3), dtype=np.uint8)
        for position, (_, row) in enumerate(rows):
            if row.pixels is not None:
                out[PIXELS][position] = row.pixels
    for name in ("status", "error", "width", "height", "resized", "face_index", "faces", "face_confidence"):
        out[name] = np.array([getattr(row, name) for _, row in rows], dtype=READ_COLUMNS[name].dtype)
    out["status"] = np.array(
        [str(status) for status in out["status"]], dtype=object
    )  # plain strings in batches
    box = READ_COLUMNS["face_box"]
    out["face_box"] = np.array([row.face_box for _, row in rows], dtype=box.dtype).reshape(total, box.width)
    out["byte_size"] = np.array(byte_sizes, dtype=READ_COLUMNS["byte_size"].dtype)[owner]
    return out
