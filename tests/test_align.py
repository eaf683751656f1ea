"""Face detection and alignment on real photographs that ship inside packages, and `--align` rows."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fiqa_curator.demo_kit.faces import _astronaut, _grace_hopper, lfw_non_faces
from fiqa_curator.workers.align import (
    ARCFACE_TEMPLATE,
    align_faces,
    detect_faces,
    similarity_transform,
    warp_to_template,
)
from fiqa_curator.workers.reading import read_and_decode

PHOTOS = {"astronaut": _astronaut, "grace_hopper": _grace_hopper}


def test_similarity_transform_equals_skimage_umeyama() -> None:
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(0)
    for _ in range(20):
        source = rng.uniform(0, 500, (5, 2))
        target = ARCFACE_TEMPLATE + rng.normal(0, 3, (5, 2))
        ours = similarity_transform(source, target)
        theirs = SimilarityTransform.from_estimate(source, target).params[:2]
        np.testing.assert_allclose(ours, theirs, atol=1e-9)
    # an exact similarity is recovered exactly
    angle, scale, shift = 0.3, 0.4, np.array([12.0, -7.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    np.testing.assert_allclose(
        similarity_transform(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE @ rotation.T + shift),
        np.hstack([rotation, shift[:, None]]),
        atol=1e-9,
    )


def test_warp_moves_known_points_onto_the_template() -> None:
    """Geometry alone, without a detector: bright dots at known places land on the template points."""
    rng = np.random.default_rng(1)
    angle, scale = 0.25, 2.7
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE @ rotation.T + np.array([140.0, 60.0])
    image = np.zeros((500, 500, 3), np.uint8)
    for x, y in points:
        yy, xx = np.mgrid[:500, :500]
        image[(xx - x) ** 2 + (yy - y) ** 2 <= 9] = 255
    image[..., 1] = rng.integers(0, 20, (500, 500))  # a little texture in another channel
    warped = warp_to_template(image, points).astype(float)[..., 0]
    for tx, ty in ARCFACE_TEMPLATE:  # centroid of the warped dot near each template point
        yy, xx = np.mgrid[:112, :112]
        near = ((xx - tx) ** 2 + (yy - ty) ** 2 <= 16) * warped
        centroid = np.array([(near * xx).sum(), (near * yy).sum()]) / near.sum()
        assert np.linalg.norm(centroid - (tx, ty)) < 0.35


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_alignment_puts_detected_landmarks_on_the_template(name: str) -> None:
    photo = PHOTOS[name]()[0]
    faces = detect_faces(photo)
    assert faces and faces[0].confidence > 0.5
    aligned = warp_to_template(photo, faces[0].landmarks)
    assert aligned.shape == (112, 112, 3)
    # detect again on the aligned crop (with a margin, as the detector needs context)
    redetected = detect_faces(np.pad(aligned, ((56, 56), (56, 56), (0, 0))), upsample=1)  # a small image
    assert redetected, "the aligned face is no longer found"
    landmarks = redetected[0].landmarks - 56
    errors = np.linalg.norm(landmarks - ARCFACE_TEMPLATE, axis=1)
    # eyes and nose within a few pixels; mouth corners follow the expression (a wide smile is wider than
    # the template's average mouth), so within 8
    assert errors[:3].max() < 4.5, errors
    assert errors.max() < 8.0, errors
    # where the similarity put the original landmarks is where they are found again: the warp is exact
    matrix = similarity_transform(faces[0].landmarks, ARCFACE_TEMPLATE)
    mapped = faces[0].landmarks @ matrix[:, :2].T + matrix[:, 2]
    assert np.linalg.norm(landmarks - mapped, axis=1).max() < 3.0


def test_no_face_on_textures_and_several_faces_largest_first() -> None:
    from skimage import data

    for texture in [data.brick(), *lfw_non_faces(5)]:
        rgb = np.stack([texture] * 3, -1) if texture.ndim == 2 else texture
        rgb = np.asarray(Image.fromarray(rgb).resize((200, 200)))
        assert detect_faces(rgb) == [] and align_faces(rgb) == []
    grace, astronaut = _grace_hopper()[0], _astronaut()[0]
    collage = np.zeros((620, 1300, 3), np.uint8)
    collage[10:610, 10:522] = grace
    collage[60:572, 700:1212] = astronaut
    faces = align_faces(collage, all_faces=True)
    assert len(faces) >= 2
    areas = [f.face.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert faces[0].face.box[2] < 522  # Grace Hopper's face is the larger one
    assert any(f.face.box[0] > 700 for f in faces[1:])
    assert len(align_faces(collage)) == 1
    # a small face alone is still found (the detector upsamples when nothing was found at full size) ...
    small = np.asarray(Image.fromarray(astronaut).resize((300, 300)))
    assert len(detect_faces(small, upsample=0)) == 0 and len(detect_faces(small)) == 1


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reading_stage_with_align_gives_rows_per_face_and_no_face(tmp_path) -> None:
    grace, astronaut = _grace_hopper()[0], _astronaut()[0]
    collage = np.zeros((620, 1100, 3), np.uint8)
    collage[10:610, 10:522] = grace
    collage[40:552, 570:1082] = astronaut
    files = {
        "collage.png": _png(collage),
        "texture.png": _png(np.stack([lfw_non_faces(1)[0]] * 3, -1)),
        "broken.png": _png(grace)[:100],
        "grace.png": _png(grace),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = sorted(files)
    batch = {
        "image_id": np.array(names, dtype=object),
        "url": np.array([str(tmp_path / n) for n in names], dtype=object),
        "offset": np.zeros(len(names), np.int64),
        "length": np.full(len(names), -1, np.int64),
        "shard": np.array(["shard-00000"] * len(names), dtype=object),
    }
    for mode in ("all", "largest"):
        out = read_and_decode(dict(batch), align=mode)
        rows = {image_id: i for i, image_id in enumerate(out["image_id"])}
        status = dict(zip(out["image_id"], out["status"], strict=True))
        assert status["broken.png"] == "decode_error" and status["texture.png"] == "no_face"
        assert out["faces"][rows["texture.png"]] == 0 and out["face_index"][rows["texture.png"]] == -1
        if mode == "all":
            faces = [image_id for image_id in rows if image_id.startswith("collage.png#face")]
            assert sorted(faces)[:2] == ["collage.png#face0", "collage.png#face1"]
            assert {out["item_rows"][rows[f]] for f in faces} == {len(faces)} and len(faces) >= 2
            assert set(out["item_id"][[rows[f] for f in faces]]) == {"collage.png"}
            assert "grace.png#face0" in rows
        else:
            assert status["collage.png"] == "ok" and out["faces"][rows["collage.png"]] >= 2
            assert out["face_index"][rows["collage.png"]] == 0 and len(rows) == len(names)
            assert set(out["item_rows"]) == {1}
        ok = np.asarray(out["status"]) == "ok"
        assert np.isfinite(out["face_box"][ok]).all() and (out["face_confidence"][ok] > 0).all()
        assert out["pixels"].shape[1:] == (112, 112, 3) and out["pixels"][ok].std() > 10
    # the aligned crop of a single-face photo is the library's own alignment, pixel for pixel
    single = read_and_decode(dict(batch), align="largest")
    grace_row = list(single["image_id"]).index("grace.png")
    expected = align_faces(grace)[0].image
    assert np.array_equal(single["pixels"][grace_row], expected)
