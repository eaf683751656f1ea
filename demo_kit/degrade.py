"""Graded, seeded degradations of an aligned 112x112 face: what makes real face images useless.

`degrade(image, kind, severity, rng)` returns a new uint8 image; severity 0 is the clean image and 1..5
grow steadily worse. The random parts (blur direction, noise, occluder position, rotation sign, cast
colour) come from `rng`, so a dataset built with one seed is identical on every machine.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fiqa_curator.schemas.errors import UserError

SEVERITIES = (1, 2, 3, 4, 5)

# Parameter per severity 1..5, chosen so that each step costs a visible amount of recognisability.
_GAUSSIAN_SIGMA = (0.8, 1.5, 2.4, 3.4, 5.0)
_MOTION_LENGTH = (5, 9, 13, 19, 27)  # pixels
_NOISE_SIGMA = (8.0, 16.0, 28.0, 42.0, 60.0)  # of 255
_JPEG_QUALITY = (40, 20, 10, 5, 2)
_DOWNSAMPLE_SIDE = (56, 37, 28, 18, 12)  # pixels, then back up to 112
_DARK_GAIN = (0.55, 0.35, 0.22, 0.12, 0.06)
_BRIGHT_GAIN = (1.5, 2.0, 2.7, 3.6, 5.0)
_OCCLUDED_FRACTION = (0.08, 0.16, 0.26, 0.38, 0.52)  # of the image area
_ROTATION_DEGREES = (8.0, 16.0, 28.0, 42.0, 60.0)
_POSE_SQUEEZE = (0.10, 0.20, 0.30, 0.42, 0.55)  # how much one side of the face is foreshortened
_CAST_MIX = (0.12, 0.24, 0.36, 0.50, 0.65)  # blend towards a saturated colour


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(_pil(image).filter(ImageFilter.GaussianBlur(_GAUSSIAN_SIGMA[severity - 1])))


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import convolve

    length = _MOTION_LENGTH[severity - 1]
    angle = rng.uniform(0, np.pi)
    kernel_image = Image.new("F", (length, length), 0.0)
    centre, reach = (length - 1) / 2, (length - 1) / 2
    dx, dy = reach * np.cos(angle), reach * np.sin(angle)
    ImageDraw.Draw(kernel_image).line((centre - dx, centre - dy, centre + dx, centre + dy), fill=1.0, width=1)
    kernel = np.asarray(kernel_image, dtype=np.float64)
    kernel /= kernel.sum()
    blurred = np.stack(
        [convolve(image[..., c].astype(np.float64), kernel, mode="reflect") for c in range(3)], -1
    )
    return _to_uint8(blurred)


def noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(image + rng.normal(0.0, _NOISE_SIGMA[severity - 1], image.shape))


def jpeg(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=_JPEG_QUALITY[severity - 1])
    return np.asarray(Image.open(buffer).convert("RGB"))


def downsample(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = _DOWNSAMPLE_SIDE[severity - 1]
    small = _pil(image).resize((side, side), Image.Resampling.BOX)
    return np.asarray(small.resize(image.shape[1::-1], Image.Resampling.BILINEAR))


def underexposure(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(image.astype(np.float64) * _DARK_GAIN[severity - 1])


def overexposure(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(image.astype(np.float64) * _BRIGHT_GAIN[severity - 1])


def occlusion(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A solid occluder (hand, mask, sticker) over the eyes, the mouth or a random part of the face."""
    height, width = image.shape[:2]
    area = _OCCLUDED_FRACTION[severity - 1] * height * width
    aspect = rng.uniform(0.6, 2.5)  # width / height
    box_w = min(width, round(float(np.sqrt(area * aspect))))
    box_h = min(height, round(area / max(box_w, 1)))
    centre_y = {0: 52, 1: 92, 2: rng.uniform(40, 95)}[int(rng.integers(3))]  # eyes, mouth, anywhere
    centre_x = rng.uniform(40, 72)
    top = int(np.clip(centre_y - box_h / 2, 0, height - box_h))
    left = int(np.clip(centre_x - box_w / 2, 0, width - box_w))
    out = image.copy()
    out[top : top + box_h, left : left + box_w] = rng.integers(0, 256, 3)
    return out


def rotation(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """In-plane rotation about the crop centre: a badly aligned face."""
    angle = _ROTATION_DEGREES[severity - 1] * (1 if rng.random() < 0.5 else -1)
    return np.asarray(_pil(image).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)))


def pose(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A yaw-like perspective warp: one half of the face foreshortened, as when the head turns away."""
    size = image.shape[0]
    squeeze = _POSE_SQUEEZE[severity - 1] * size / 2
    left_side = rng.random() < 0.5
    # Pillow's QUAD: the input points that the output's top-left, bottom-left, bottom-right and top-right
    # corners sample. Sampling a taller, wider span on the far side makes that side smaller.
    s = squeeze
    if left_side:
        quad = (-s, -s / 2, -s, size + s / 2, size, size, size, 0)
    else:
        quad = (0, 0, 0, size, size + s, size + s / 2, size + s, -s / 2)
    warped = _pil(image).transform(
        (size, size), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    return np.asarray(warped)


def colour_cast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A strong tint (wrong white balance, coloured light): blends towards a saturated colour."""
    colour = np.zeros(3)
    colour[int(rng.integers(3))] = 255.0
    colour[int(rng.integers(3))] += rng.uniform(0, 160)
    mix = _CAST_MIX[severity - 1]
    return _to_uint8(image.astype(np.float64) * (1 - mix) + np.clip(colour, 0, 255) * mix)


DEGRADATIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "noise": noise,
    "jpeg": jpeg,
    "downsample": downsample,
    "underexposure": underexposure,
    "overexposure": overexposure,
    "occlusion": occlusion,
    "rotation": rotation,
    "pose": pose,
    "colour_cast": colour_cast,
}


def degrade(image: np.ndarray, kind: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`image` (H, W, 3) uint8 degraded by `kind` at `severity` (0 = unchanged copy, 1..5)."""
    if kind not in DEGRADATIONS:
        raise UserError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)}")
    if severity == 0:
        return np.array(image, dtype=np.uint8, copy=True)
    if severity not in SEVERITIES:
        raise UserError(f"severity must be 0..{SEVERITIES[-1]}, got {severity}")
    return np.ascontiguousarray(
        DEGRADATIONS[kind](np.asarray(image, dtype=np.uint8), severity, rng), dtype=np.uint8
    )
