"""Face detection, five landmarks and the warp to the ArcFace 112x112 template, for raw photographs.

Detector and landmarks come from dlib (the `dlib-bin` wheel) with the models that ship inside the
`face_recognition_models` package: nothing is downloaded. dlib's HOG frontal-face detector finds boxes
with a confidence score; its 68-point shape predictor gives the points from which the five ArcFace points
are taken (eye centres = mean of each eye's six contour points, nose tip = point 30, mouth corners =
points 48 and 54). A similarity transform (rotation, uniform scale, translation; Umeyama's least squares)
maps them onto the template, exactly as the ArcFace/insightface alignment does.

This module imports no torch: it runs inside the light Ray reading tasks. The models are loaded once per
process (about 0.7 s) and reused.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# ArcFace 5-point template for 112x112 crops (VITFIQA.md): left eye, right eye, nose tip, left and right
# mouth corner, as they appear in the image; pixel-index coordinates (the centre of pixel i is i).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
TEMPLATE_SIZE = 112
# Photos larger than this (longest side) are detected on a downscaled copy; landmarks use full resolution.
DETECT_MAX_SIDE = 1024


class AlignerUnavailable(RuntimeError):
    """dlib or face_recognition_models is not installed."""


def models_folder() -> Path:
    """The folder of dlib model files inside the installed `face_recognition_models` package.

    Located without importing the package: its `__init__` needs `pkg_resources`, which setuptools >= 81
    no longer ships."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise AlignerUnavailable(
            "face alignment needs the face_recognition_models package (pip install face_recognition_models)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@functools.cache
def _dlib_models() -> tuple[object, object]:
    try:
        import dlib
    except ImportError as error:  # pragma: no cover - dlib-bin is a dependency
        raise AlignerUnavailable("face alignment needs dlib (pip install dlib-bin)") from error
    predictor = dlib.shape_predictor(str(models_folder() / "shape_predictor_68_face_landmarks.dat"))
    return dlib.get_frontal_face_detector(), predictor


@dataclass(frozen=True)
class Face:
    """One detected face in source-image pixels: box (x0, y0, x1, y1), detector confidence (dlib's SVM
    score; 0 is the detector's own threshold, higher is surer) and the five ArcFace landmarks (5, 2)."""

    box: tuple[float, float, float, float]
    confidence: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991, no reflection) mapping `source` points onto `target`,
    as a 2x3 matrix. Written out (not skimage's) so that reading tasks stay light; tests compare the two."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    variance_s = (centred_s**2).sum() / len(source)
    scale = (singular * sign).sum() / variance_s if variance_s > 0 else 1.0
    translation = mean_t - scale * rotation @ mean_s
    return np.hstack([scale * rotation, translation[:, None]])


def warp_to_template(rgb: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Warp an (H, W, 3) uint8 image so that its five landmarks land on the ArcFace template; (size, size, 3).

    Same geometry as OpenCV's `warpAffine` with the estimated matrix (bilinear, black border), done with
    Pillow, whose affine transform samples pixel centres at +0.5: the offsets below convert."""
    template = ARCFACE_TEMPLATE * (size / TEMPLATE_SIZE)
    matrix = np.vstack([similarity_transform(landmarks, template), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(matrix)  # output pixel index -> input pixel index
    linear, offset = inverse[:2, :2], inverse[:2, 2]
    offset = offset + 0.5 - linear @ np.array([0.5, 0.5])  # index coordinates -> Pillow's continuous ones
    coefficients = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    warped = image.transform((size, size), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
    return np.asarray(warped, dtype=np.uint8).copy()


def landmarks_from_68(points: np.ndarray) -> np.ndarray:
    """dlib's 68 points (68, 2) -> the five ArcFace points (5, 2)."""
    points = np.asarray(points, dtype=np.float64)
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


def detect_faces(rgb: np.ndarray, *, upsample: int | None = None, min_confidence: float = 0.0) -> list[Face]:
    """Faces in an (H, W, 3) uint8 RGB image, largest first (ties: the more confident first).

    dlib's HOG detector finds faces of about 80 px and more; each `upsample` doubles the image first to
    find smaller ones, at 4x the cost. The default (None) tries without upsampling and upsamples once only
    when that found nothing: a photo with a large face costs a quarter, a photo with only small faces is
    still searched (small faces beside a large one are then not reported: pass upsample=1)."""
    if upsample is None:
        return detect_faces(rgb, upsample=0, min_confidence=min_confidence) or detect_faces(
            rgb, upsample=1, min_confidence=min_confidence
        )
    import dlib

    detector, predictor = _dlib_models()
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    small = (
        rgb
        if scale == 1.0
        else np.asarray(
            Image.fromarray(rgb).resize(
                (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR
            )
        )
    )
    rects, scores, _ = detector.run(small, upsample, min_confidence)
    faces = []
    for rect, score in zip(rects, scores, strict=True):
        box = (
            rect.left() / scale,
            rect.top() / scale,
            (rect.right() + 1) / scale,
            (rect.bottom() + 1) / scale,
        )
        full_rect = dlib.rectangle(round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1)
        shape = predictor(rgb, full_rect)
        points = np.array(
            [[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=np.float64
        )
        faces.append(Face(box=box, confidence=float(score), landmarks=landmarks_from_68(points)))
    return sorted(faces, key=lambda face: (-face.area, -face.confidence))


def landmarks_in_box(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The five ArcFace points of the face in a known box (no detection): for crops already centred on a
    face."""
    import dlib

    _, predictor = _dlib_models()
    rect = dlib.rectangle(round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1)
    shape = predictor(np.ascontiguousarray(rgb, dtype=np.uint8), rect)
    return landmarks_from_68(np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)]))


@dataclass(frozen=True)
class AlignedFace:
    face: Face
    image: np.ndarray  # (size, size, 3) uint8, aligned to the ArcFace template


def align_faces(
    rgb: np.ndarray,
    *,
    all_faces: bool = False,
    size: int = TEMPLATE_SIZE,
    upsample: int | None = None,
    min_confidence: float = 0.0,
) -> list[AlignedFace]:
    """Detect, then align: the largest face only (default) or every face, largest first. [] when none."""
    faces = detect_faces(rgb, upsample=upsample, min_confidence=min_confidence)
    if not all_faces:
        faces = faces[:1]
    return [AlignedFace(face, warp_to_template(rgb, face.landmarks, size)) for face in faces]
