"""Source faces that ship inside installed packages, aligned to the ArcFace 112x112 template.

Nothing here is downloaded: every photograph comes from a package's own data files. Each source records
where it comes from and under which terms, and how it was aligned (`detected`: dlib detection and 68
landmarks; `box`: landmarks inside the known crop, where the detector found no face in a tiny crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from fiqa_curator.workers.align import detect_faces, landmarks_in_box, warp_to_template

LFW_UPSCALE = 100  # lfw_subset crops are 25x25: upscaled (bicubic) so that detector and landmarks work
LFW_PAD = 30  # edge-replicated margin around the upscaled crop: the detector wants some context


@dataclass(frozen=True)
class SourceFace:
    face_id: str
    aligned: np.ndarray  # (112, 112, 3) uint8, ArcFace template
    provenance: str
    licence: str
    alignment: str  # "detected" or "box"
    original_size: tuple[int, int]


def _astronaut() -> tuple[np.ndarray, str, str]:
    from skimage import data

    return (
        data.astronaut(),
        "scikit-image skimage.data.astronaut(): NASA portrait of astronaut Eileen Collins",
        "public domain (NASA); redistributed by scikit-image (BSD-3-Clause)",
    )


def _grace_hopper() -> tuple[np.ndarray, str, str]:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = np.asarray(Image.open(handle).convert("RGB"))
    return (
        image,
        "matplotlib sample data grace_hopper.jpg: US Navy portrait of Rear Admiral Grace Hopper",
        "public domain (US Navy); redistributed by matplotlib (PSF-style licence)",
    )


def _align_photo(face_id: str, loader) -> SourceFace:
    image, provenance, licence = loader()
    faces = detect_faces(image, upsample=1)  # fixed: the demo model was trained on these crops
    if not faces:  # pragma: no cover - these package photos are known to contain a detectable face
        raise RuntimeError(f"no face detected in {face_id}")
    return SourceFace(
        face_id,
        warp_to_template(image, faces[0].landmarks),
        provenance,
        licence,
        "detected",
        (image.shape[1], image.shape[0]),
    )


def lfw_faces(count: int = 100) -> list[SourceFace]:
    """The faces of scikit-image's `lfw_subset()` (the first 100 of its 200 crops; the rest are non-faces)."""
    from skimage import data

    crops = data.lfw_subset()[:count]
    faces = []
    for index, crop in enumerate(crops):
        grey = Image.fromarray(np.clip(np.rint(crop * 255), 0, 255).astype(np.uint8))
        big = np.asarray(grey.resize((LFW_UPSCALE, LFW_UPSCALE), Image.Resampling.BICUBIC).convert("RGB"))
        padded = np.pad(big, ((LFW_PAD, LFW_PAD), (LFW_PAD, LFW_PAD), (0, 0)), mode="edge")
        detected = detect_faces(padded, upsample=1)
        if detected:
            landmarks, how = detected[0].landmarks, "detected"
        else:
            side = LFW_PAD + LFW_UPSCALE
            landmarks, how = landmarks_in_box(padded, (LFW_PAD, LFW_PAD, side, side)), "box"
        faces.append(
            SourceFace(
                f"lfw{index:03d}",
                warp_to_template(padded, landmarks),
                f"scikit-image skimage.data.lfw_subset() face "
                f"#{index} (Labeled Faces in the Wild, Huang et al. 2007; 25x25 grey crop)",
                "LFW images are news photographs collected for research; "
                "redistributed by scikit-image (BSD-3-Clause)",
                how,
                (25, 25),
            )
        )
    return faces


def lfw_non_faces(count: int = 100) -> list[np.ndarray]:
    """Background crops of `lfw_subset()` (no face): inputs that must come out as `no_face`."""
    from skimage import data

    return [
        np.clip(np.rint(crop * 255), 0, 255).astype(np.uint8) for crop in data.lfw_subset()[100 : 100 + count]
    ]


def source_faces() -> list[SourceFace]:
    """Every source face, in a fixed order: the two portraits, then the LFW crops."""
    return [_align_photo("astronaut", _astronaut), _align_photo("grace_hopper", _grace_hopper), *lfw_faces()]
