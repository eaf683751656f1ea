"""The reading stage that runs as light Ray tasks: bytes in, decoded 112x112 RGB faces out.

`read_and_decode` reads each item's bytes (a whole file or a byte range of a tar shard) with retries and
decodes it; every failure becomes a status and a reason. It imports no torch: a fresh Ray worker that runs
it starts in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from workers.io import protocol_of, read_range
from workers.preprocess import DEFAULT_MAX_PIXELS, DecodedImage, DecodeStatus, decode_face

READ_THREADS = 16  # object stores reward many requests in flight; local disks do not mind


def _load_one(
    url: str, offset: int, length: int, storage_options: Mapping[str, Any] | None, size: int, max_pixels: int
) -> tuple[DecodedImage, int, str]:
    try:
        data = read_range(url, int(offset), int(length), storage_options)
    except Exception as error:
        return DecodedImage(DecodeStatus.DECODE_ERROR), -1, f"{type(error).__name__}: {error}"
    return decode_face(data, size=size, max_pixels=max_pixels), len(data), ""


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    storage_options: Mapping[str, Any] | None = None,
    options_protocol: str | None = None,
    img_size: int = 112,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """Items (image_id, url, offset, length, ...) -> the same columns plus pixels and decode results."""
    count = len(batch["image_id"])
    pixels = np.zeros((count, img_size, img_size, 3), dtype=np.uint8)
    status = np.empty(count, dtype=object)
    error = np.empty(count, dtype=object)
    width = np.full(count, -1, dtype=np.int64)
    height = np.full(count, -1, dtype=np.int64)
    byte_size = np.full(count, -1, dtype=np.int64)
    resized = np.zeros(count, dtype=bool)
    jobs = zip(batch["url"], batch["offset"], batch["length"], strict=True)
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, count))) as pool:
        # Options (credentials) go only to URLs of the store they were given for: a manifest may also name
        # https:// or other stores, which must not receive them.
        results = list(pool.map(
            lambda job: _load_one(*job, storage_options if protocol_of(job[0]) == options_protocol else None,
                                  img_size, max_pixels), jobs))
    for index, (decoded, n_bytes, read_error) in enumerate(results):
        byte_size[index] = n_bytes
        if read_error:
            status[index], error[index] = "read_error", read_error
            continue
        status[index], error[index] = str(decoded.status), decoded.error or ""
        width[index] = decoded.width if decoded.width is not None else -1
        height[index] = decoded.height if decoded.height is not None else -1
        if decoded.ok:
            pixels[index] = decoded.image
            resized[index] = decoded.resized
    passthrough = {key: value for key, value in batch.items() if key not in ("url", "offset", "length")}
    return {**passthrough, "pixels": pixels, "status": status, "error": error, "width": width,
            "height": height, "byte_size": byte_size, "resized": resized}
