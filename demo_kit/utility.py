"""The utility target: how well a real face-recognition model still recognises a degraded face.

The FR model is dlib's 128-d ResNet (`dlib_face_recognition_resnet_model_v1.dat` from the
`face_recognition_models` package; trained with a Euclidean metric, same person below 0.6). It reads each
112x112 crop exactly as the quality model sees it: through one fixed chip (the 150x150 window that dlib's
own `get_face_chip(size=150, padding=0.25)` cuts around a template-aligned face, measured as the median
over the 102 aligned source faces), never re-aligned per image, so a rotated or shifted crop costs the FR
model what it costs in a real pipeline that trusts its aligner.

Utility of an image x of face i (the identification margin in dlib's own metric):

    utility(x) = min_{j != i} d(x, ref_j) - d(x, ref_i)

where d is Euclidean distance and ref_j is the reference of face j: the embedding of its clean image
mirrored left-right. Positive: x is still closer to its own face than to any other face. It falls as
the genuine match weakens or as x drifts towards someone else. The mirror keeps the clean image from
matching itself at distance 0, which would make clean images trivially perfect.

Why this and not CR-FIQA's ratio of cosine similarities: dlib's embedding is trained for Euclidean
distance, and the margin is in the units where its 0.6 decision threshold lives.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from fiqa_curator.workers.align import models_folder

# dlib's 150x150 chip in the ArcFace 112x112 frame: centre (x, y) and side, angle 0 (measured, see above).
CHIP_CENTRE = (56.53, 71.52)
CHIP_SIDE = 100.5
CHIP_SIZE = 150


@functools.cache
def _recogniser():
    import dlib

    return dlib.face_recognition_model_v1(str(models_folder() / "dlib_face_recognition_resnet_model_v1.dat"))


def _chip_details():
    import dlib

    half = CHIP_SIDE / 2
    rect = dlib.drectangle(
        CHIP_CENTRE[0] - half, CHIP_CENTRE[1] - half, CHIP_CENTRE[0] + half, CHIP_CENTRE[1] + half
    )
    return dlib.chip_details(rect, dlib.chip_dims(CHIP_SIZE, CHIP_SIZE), 0.0)


def fr_chips(images: np.ndarray) -> list[np.ndarray]:
    """(N, 112, 112, 3) uint8 aligned crops -> dlib's 150x150 input chips (fixed window, black outside)."""
    import dlib

    details = _chip_details()
    return [
        np.asarray(dlib.extract_image_chip(np.ascontiguousarray(image, dtype=np.uint8), details))
        for image in images
    ]


def _embed_serial(images: np.ndarray) -> np.ndarray:
    model = _recogniser()
    descriptors = model.compute_face_descriptor(fr_chips(images)) if len(images) else []
    return np.array([np.asarray(d, dtype=np.float32) for d in descriptors], dtype=np.float32).reshape(-1, 128)


def fr_embeddings(images: np.ndarray, *, processes: int | None = None, chunk: int = 64) -> np.ndarray:
    """(N, 112, 112, 3) uint8 aligned crops -> (N, 128) float32 dlib face descriptors.

    dlib runs its network on one core (~70 ms a face here); `processes` > 1 spreads chunks over a pool.
    The result does not depend on the pool size."""
    images = np.asarray(images, dtype=np.uint8)
    processes = processes if processes is not None else min(os.cpu_count() or 1, 4)
    if processes <= 1 or len(images) <= chunk:
        return _embed_serial(images)
    chunks = [images[start : start + chunk] for start in range(0, len(images), chunk)]
    # spawn, not fork: the caller may hold threads (torch, Ray) that a forked child would inherit half-dead
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(_embed_serial, chunks)))


def references(clean: np.ndarray) -> np.ndarray:
    """Reference embeddings of the clean faces (N, 112, 112, 3): each one's mirror image."""
    return fr_embeddings(np.ascontiguousarray(clean[:, :, ::-1]))


def utility(embeddings: np.ndarray, face_index: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Identification margin of each embedding against the references (see the module docstring)."""
    distances = np.linalg.norm(embeddings[:, None, :].astype(np.float64) - refs[None, :, :], axis=2)
    rows = np.arange(len(embeddings))
    genuine = distances[rows, face_index]
    distances[rows, face_index] = np.inf
    return (distances.min(axis=1) - genuine).astype(np.float32)
