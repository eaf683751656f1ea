"""Decoding and preprocessing: every format, mode and failure, with files made here."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fiqa_curator.workers import DecodeStatus, decode_face, normalize

RNG = np.random.default_rng(7)
FACE = RNG.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
_yy, _xx = np.mgrid[0:112, 0:112]
SMOOTH = np.dstack([_xx * 2, _yy * 2, (_xx + _yy)]).astype(np.uint8)  # lossy codecs keep gradients well


def encode(image: Image.Image | np.ndarray, image_format: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "image_format,options,max_error",
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("JPEG", {"quality": 95}, 30),
        ("WEBP", {"quality": 90}, 30),
    ],
)
def test_formats_decode_to_rgb(image_format: str, options: dict, max_error: int) -> None:
    original = SMOOTH if max_error else FACE
    result = decode_face(encode(original, image_format, **options))
    assert result.status is DecodeStatus.OK and result.ok
    assert result.image.shape == (112, 112, 3) and result.image.dtype == np.uint8
    assert result.format == image_format and not result.resized
    assert (result.width, result.height) == (112, 112)
    error = np.abs(result.image.astype(int) - original.astype(int))
    assert error.max() <= max_error
    assert error.mean() < 3  # lossy, but the same picture


def test_gif_first_frame() -> None:
    red = Image.new("RGB", (112, 112), (255, 0, 0))
    blue = Image.new("RGB", (112, 112), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    result = decode_face(data)
    assert result.ok and result.mode == "P"
    assert tuple(result.image[50, 50]) == (255, 0, 0)


def test_exif_orientation_is_applied() -> None:
    # A 112x80 landscape picture, left half black, right half white, stored with orientation 6
    # ("rotate 90 clockwise to display"): displayed it is 80 wide and 112 tall, black on top.
    pixels = np.zeros((80, 112, 3), dtype=np.uint8)
    pixels[:, 56:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(pixels, "JPEG", quality=100, exif=exif.tobytes())
    result = decode_face(data)
    assert result.ok and (result.width, result.height) == (80, 112) and result.resized
    assert result.image[10].mean() < 30 and result.image[100].mean() > 225
    plain = decode_face(encode(pixels, "JPEG", quality=100))
    assert (plain.width, plain.height) == (112, 80)


def test_grayscale_and_bilevel() -> None:
    grey = FACE[..., 0]
    result = decode_face(encode(grey, "PNG"))
    assert result.ok and result.mode == "L"
    np.testing.assert_array_equal(result.image, np.repeat(grey[..., None], 3, axis=2))
    bilevel = Image.fromarray(grey > 127)
    result = decode_face(encode(bilevel, "PNG"))
    assert result.ok and result.mode == "1"
    np.testing.assert_array_equal(result.image[..., 1], np.where(grey > 127, 255, 0))


def test_palette_with_and_without_transparency() -> None:
    palette_image = Image.fromarray(FACE).quantize(colors=64)
    result = decode_face(encode(palette_image, "PNG"))
    assert result.ok and result.mode == "P"
    np.testing.assert_array_equal(result.image, np.asarray(palette_image.convert("RGB")))
    transparent = palette_image.copy()
    transparent.info["transparency"] = 0
    result = decode_face(encode(transparent, "PNG", transparency=0))
    index_zero = np.asarray(palette_image) == 0
    assert result.ok and index_zero.any()
    assert (result.image[index_zero] == 0).all()  # transparent pixels on black


def test_cmyk() -> None:
    cmyk = Image.fromarray(FACE).convert("CMYK")
    result = decode_face(encode(cmyk, "TIFF"))
    assert result.ok and result.mode == "CMYK"
    np.testing.assert_array_equal(result.image, FACE)
    result = decode_face(encode(Image.fromarray(SMOOTH).convert("CMYK"), "JPEG", quality=100))
    assert result.ok and result.mode == "CMYK"
    assert np.abs(result.image.astype(int) - SMOOTH).mean() < 3


def test_rgba_composited_on_black() -> None:
    alpha = np.full((112, 112), 255, dtype=np.uint8)
    alpha[:10] = 0
    alpha[10:20] = 128
    rgba = np.dstack([FACE, alpha])
    result = decode_face(encode(rgba, "PNG"))
    assert result.ok and result.mode == "RGBA"
    np.testing.assert_array_equal(result.image[20:], FACE[20:])  # opaque: untouched
    assert (result.image[:10] == 0).all()  # transparent: black
    half = np.rint(FACE[10:20].astype(float) * 128 / 255)
    assert np.abs(result.image[10:20] - half).max() <= 1
    la = Image.fromarray(np.dstack([FACE[..., 0], alpha]), mode="LA")
    assert decode_face(encode(la, "PNG")).image[:10].max() == 0


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.linspace(0, 65535, 112 * 112).reshape(112, 112).astype(np.uint16)
    result = decode_face(encode(Image.fromarray(values), "PNG"))
    assert result.ok and result.mode.startswith("I")
    expected = np.rint(values / 257.0)
    assert np.abs(result.image[..., 0].astype(int) - expected).max() <= 1
    assert result.image.max() == 255 and result.image.min() == 0


def _png_rgb16(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    height, width, _ = values.shape
    raw = b"".join(b"\x00" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_rgb() -> None:
    values = (FACE.astype(np.uint16) * 257 + RNG.integers(0, 200, FACE.shape)).astype(np.uint16)
    result = decode_face(_png_rgb16(values))
    assert result.ok
    assert np.abs(result.image.astype(int) - values / 257.0).max() <= 1


def test_other_sizes_are_resized_and_flagged() -> None:
    big = np.kron(SMOOTH, np.ones((4, 4, 1), dtype=np.uint8))  # 448x448 made of 4x4 blocks
    result = decode_face(encode(big, "PNG"))
    assert result.ok and result.resized and (result.width, result.height) == (448, 448)
    assert result.image.shape == (112, 112, 3)
    assert np.abs(result.image.astype(int) - SMOOTH).mean() < 2  # downscaled, not cropped
    small = decode_face(encode(FACE[:50, :70], "PNG"))
    assert small.ok and small.resized and (small.width, small.height) == (70, 50)


@pytest.mark.parametrize("side", [9000, 20000])  # over our limit; also over Pillow's own hard limit
def test_decompression_bomb_refused_before_decoding(side: int) -> None:
    bomb = encode(Image.new("L", (side, side)), "PNG")  # tens of kB on disk, up to 400 Mpx decoded
    assert len(bomb) < 1_000_000
    result = decode_face(bomb)
    assert result.status is DecodeStatus.TOO_LARGE and "exceeds" in result.error
    assert str(side * side) in result.error
    limited = decode_face(encode(FACE, "PNG"), max_pixels=100 * 100)
    assert limited.status is DecodeStatus.TOO_LARGE


@pytest.mark.parametrize(
    "data,status,message",
    [
        (b"", DecodeStatus.DECODE_ERROR, "empty file"),
        (b"definitely not an image" * 20, DecodeStatus.DECODE_ERROR, "not a recognised image"),
        (encode(FACE, "PNG")[:400], DecodeStatus.DECODE_ERROR, ""),
        (encode(FACE, "JPEG")[:300], DecodeStatus.DECODE_ERROR, ""),
        (encode(FACE, "ICO"), DecodeStatus.UNSUPPORTED_FORMAT, "ICO images are not supported"),
        (encode(FACE, "PPM"), DecodeStatus.UNSUPPORTED_FORMAT, "PPM images are not supported"),
    ],
    ids=["empty", "garbage", "truncated-png", "truncated-jpeg", "ico", "ppm"],
)
def test_failures_are_typed_results(data: bytes, status: DecodeStatus, message: str) -> None:
    result = decode_face(data)
    assert result.status is status and not result.ok
    assert result.image is None
    assert result.error and message in result.error


def test_normalisation_is_the_official_one() -> None:
    images = np.stack([FACE, 255 - FACE])
    pixels = normalize(images)
    assert pixels.shape == (2, 3, 112, 112) and pixels.dtype == torch.float32
    official = torch.Tensor(images.transpose(0, 3, 1, 2).astype(np.float32))
    official.div_(255).sub_(0.5).div_(0.5)
    assert torch.equal(pixels, official)
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    with pytest.raises(ValueError, match="uint8"):
        normalize(images.astype(np.float32))
