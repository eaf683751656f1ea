"""Reading input bytes from any fsspec URL, whole files or byte ranges (members of tar shards), with
retries and backoff for transient object-store errors. A failure is a value, not an exception."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol

T = TypeVar("T")
PERMANENT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError)


def with_retries(
    action: Callable[[], T], *, attempts: int = 9, base_delay: float = 0.2, max_delay: float = 15.0
) -> T:
    """Run `action`, retrying errors that may be transient (network, throttling, 5xx) with jittered
    exponential backoff: 40 to 60 s of waiting in all by default, so that a store restarting (tens of
    seconds) costs time, not rows. Errors that cannot get better (missing file, permissions) are raised at
    once."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except PERMANENT_ERRORS:
            raise
        except Exception:
            if attempt == attempts:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            # jitter upwards only: spreads the retries of many readers without shortening the whole wait
            time.sleep(delay * (1 + 0.5 * random.random()))
    raise AssertionError("unreachable")


def filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of one URL. Not `url_to_fs`: it reads "::" as a chain of filesystems, and
    "::" is a legal character pair in file names and object keys."""
    protocol, _ = split_protocol(url)
    fs = fsspec.filesystem(protocol or "file", **dict(storage_options or {}))
    return fs, fs._strip_protocol(url)


def protocol_of(url: str) -> str:
    return split_protocol(url)[0] or "file"


def read_range(
    url: str,
    offset: int = -1,
    length: int = -1,
    storage_options: Mapping[str, Any] | None = None,
    *,
    attempts: int = 9,
) -> bytes:
    """Bytes of `url`, or of `length` bytes at `offset` when offset >= 0."""
    fs, path = filesystem(url, storage_options)
    if offset >= 0:
        return with_retries(lambda: fs.cat_file(path, start=offset, end=offset + length), attempts=attempts)
    return with_retries(lambda: fs.cat_file(path), attempts=attempts)
