"""Every status a quality-table row can have, declared once: the reading stage, the scoring stage, the
writer, the table schema and the report all take them from here."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Why a row has (or has no) scores. `ok` rows are scored; every other value is a reason, with a
    human-readable `error` beside it."""

    OK = "ok"
    DECODE_ERROR = "decode_error"  # the bytes are not a decodable image (corrupt, truncated, empty)
    UNSUPPORTED_FORMAT = "unsupported_format"  # an image format we do not decode (HEIC, AVIF, ...)
    TOO_LARGE = "too_large"  # over --max-pixels, refused from the header before decoding
    READ_ERROR = "read_error"  # the bytes could not be read (after retries); rescored by --since
    NO_FACE = "no_face"  # --align: the detector found no face in the photo


STATUS_VALUES = tuple(status.value for status in Status)
