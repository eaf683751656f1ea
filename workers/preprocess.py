"""Image bytes -> RGB 112x112 uint8, and the official input normalisation.

Every outcome is a `DecodedImage` with a status; no decoding error escapes to the caller. Inputs are
expected to be aligned face crops (ArcFace template); other sizes are resized and flagged, not aligned.
Raw photographs go through `decode_image` (full size) and `workers.align` instead (`fiqa score --align`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from fiqa_curator.schemas.status import Status
from fiqa_curator.workers.settings import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:  # decoding runs in light Ray tasks that never import torch
    import torch

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
DEFAULT_SIZE = 112
EXIF_ORIENTATION = 0x0112


# Decoding's outcomes are table statuses (ok, decode_error, unsupported_format, too_large): one enum, declared
# with the table; the name stays for the Python API.
DecodeStatus = Status


@dataclass
class DecodedImage:
    """Outcome of decoding one file. `image` is (size, size, 3) uint8 RGB when status is ok, else None.

    width/height are the decoded size after EXIF orientation (None when unknown); `resized` says whether
    the pixels were resampled to reach the model's input size.
    """

    status: DecodeStatus
    image: np.ndarray | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    mode: str | None = None
    resized: bool = False

    @property
    def ok(self) -> bool:
        return self.status is DecodeStatus.OK


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited onto black (identical to dropping it where the
    image is opaque, deterministic where it is transparent); high bit depths are scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        elif mode == "F" and values.size and np.nanmax(values) <= 1.0:
            scale = 255.0  # float images in [0, 1]
        elif mode == "I" and values.size and np.nanmax(values) > 255:
            scale = 255.0 / 65535.0  # 16-bit data that Pillow widened to 32-bit integers
        else:
            scale = 1.0
        grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes (JPEG, PNG, WebP, BMP, TIFF, GIF first frame) to RGB uint8 at their own size
    (after EXIF orientation): the input of face alignment."""
    if not data:
        return DecodedImage(DecodeStatus.DECODE_ERROR, error="empty file")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; Pillow's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            except UnidentifiedImageError:
                return _unidentified(data)
            width, height = image.size
            if width * height > max_pixels:
                return DecodedImage(
                    DecodeStatus.TOO_LARGE,
                    error=f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                    width=width,
                    height=height,
                    format=image.format,
                )
            image_format, source_mode = image.format, image.mode
            image.seek(0)  # GIF/TIFF: first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except Image.DecompressionBombError as error:
        return DecodedImage(DecodeStatus.TOO_LARGE, error=str(error))
    except Exception as error:  # truncated/corrupt data (OSError, SyntaxError, ...) or a decoder bug: a row
        return DecodedImage(DecodeStatus.DECODE_ERROR, error=f"{type(error).__name__}: {error}")
    width, height = rgb.size
    return DecodedImage(
        DecodeStatus.OK,
        image=np.asarray(rgb, dtype=np.uint8).copy(),
        width=width,
        height=height,
        format=image_format,
        mode=source_mode,
    )


def decode_face(
    data: bytes,
    *,
    size: int = DEFAULT_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode image bytes to RGB (size, size) uint8: an aligned crop as it is, any other size resized."""
    decoded = decode_image(data, max_pixels=max_pixels)
    if not decoded.ok or decoded.image.shape[:2] == (size, size):
        return decoded
    # Pillow's resampling filters adapt their support when shrinking, so large images are anti-aliased.
    resized = Image.fromarray(decoded.image).resize((size, size), Image.Resampling.BILINEAR)
    decoded.image = np.asarray(resized, dtype=np.uint8).copy()
    decoded.resized = True
    return decoded


def plain_jpeg(data: bytes, *, size: int = DEFAULT_SIZE) -> bool:
    """Whether `data` is a JPEG that a device decoder turns into what `decode_face` would give: baseline
    (not progressive), exactly size x size, grey or RGB with full-resolution chroma (4:4:4), no EXIF
    rotation, ending with its end-of-image marker (a truncated file stays on the CPU, whose decoder reports
    it; nvJPEG may not). Reads the header only (tens of microseconds); anything else, CMYK included, stays
    on the CPU path.

    Subsampled chroma (4:2:0, 4:2:2: most JPEGs) stays on the CPU because nvJPEG upsamples it otherwise
    than libjpeg-turbo: on an H200, 4:2:0 crops came out up to 40 levels apart (mean 4.6) and a model's
    scores up to 0.15 apart, 4:4:4 crops bit for bit equal (benchmarks/gpu_check.py, docs/benchmarks.md).
    A score must not depend on where its image was decoded."""
    if data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            return (
                image.size == (size, size)
                and (image.mode == "L" or (image.mode == "RGB" and JpegImagePlugin.get_sampling(image) == 0))
                and not image.info.get("progressive")
                and not image.info.get("progression")
                and image.getexif().get(EXIF_ORIENTATION, 1) == 1
            )
    except Exception:  # untrusted bytes: whatever Pillow raises on them, the CPU path decides (with a reason)
        return False


def _unidentified(data: bytes) -> DecodedImage:
    """Tell a real image in a format we do not take from bytes that no decoder recognises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = Image.open(io.BytesIO(data))
        return DecodedImage(
            DecodeStatus.UNSUPPORTED_FORMAT,
            error=f"{other.format} images are not supported (supported: {', '.join(SUPPORTED_FORMATS)})",
            format=other.format,
        )
    except Exception:  # untrusted bytes that no opener recognises: Pillow raises many kinds on them
        return DecodedImage(DecodeStatus.DECODE_ERROR, error="not a recognised image file")


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32, exactly the official `x/255 - 0.5) / 0.5`."""
    import torch

    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {tuple(tensor.shape)} {tensor.dtype}")
    pixels = tensor.permute(0, 3, 1, 2).float()
    # Same operations in the same order as the official evaluation code, for bit-identical inputs.
    return pixels.div_(255).sub_(0.5).div_(0.5)
