"""The GPU path's pieces that run on the CPU too: JPEG decoding in the scoring actor (`--decode device`;
libjpeg through torchvision here, nvJPEG on a GPU), bf16 autocast and precision as part of the
configuration, and batch sizes from free memory. What only a GPU can show (nvJPEG's pixels, the memory
probe, bf16 speed) is measured by benchmarks/gpu_check.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiqa_curator.flows.cluster import actor_placement, scoring_device
from fiqa_curator.flows.configuration import scoring_config
from fiqa_curator.flows.options import ScoreOptions
from fiqa_curator.flows.plan import PlanConflict
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.workers import QualityScorer, load_model
from fiqa_curator.workers.device_decode import decode_jpegs
from fiqa_curator.workers.preprocess import decode_face, plain_jpeg
from fiqa_curator.workers.reading import read_and_decode
from fiqa_curator.workers.scoring import AUTO_BATCH_CAP, CPU_BATCH_SIZE, batch_size_for_memory
from fiqa_curator.workers.stages import ScoreActor
from tests.conftest import TOLERANCE, ReferenceFixture


def _jpeg(image: np.ndarray, **save: object) -> bytes:
    """Full-resolution chroma (4:4:4) unless `subsampling` says otherwise: what a device decoder takes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", **{"quality": 90, "subsampling": "4:4:4", **save})
    return buffer.getvalue()


def _rotated(image: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    return _jpeg(image, exif=exif.tobytes())


def _variants(images: np.ndarray) -> dict[str, bytes]:
    """Every kind of input the two decode paths must agree on, keyed by file name."""
    png = io.BytesIO()
    Image.fromarray(images[1]).save(png, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(images[2]).convert("CMYK").save(cmyk, format="JPEG")
    plain = _jpeg(images[0])
    return {
        **{f"plain_{i}.jpg": _jpeg(image) for i, image in enumerate(images)},
        "grey.jpg": _jpeg(images[3][:, :, 0]),
        "chroma_420.jpg": _jpeg(images[7], subsampling="4:2:0"),  # Pillow's default: most JPEGs
        "chroma_422.jpg": _jpeg(images[7], subsampling="4:2:2"),
        "progressive.jpg": _jpeg(images[4], progressive=True),
        "larger.jpg": _jpeg(np.asarray(Image.fromarray(images[5]).resize((128, 128)))),
        "rotated.jpg": _rotated(images[6]),
        "face.png": png.getvalue(),
        "cmyk.jpg": cmyk.getvalue(),
        "truncated.jpg": plain[: len(plain) // 2],
        "corrupt_middle.jpg": plain[: len(plain) // 2]
        + b"\xff\xd9",  # Pillow decodes it (garbage): so must we
        "empty.jpg": b"",
        "not_an_image.jpg": b"\xff\xd8\xff" + b"no jpeg here" * 10 + b"\xff\xd9",
    }


def test_plain_jpeg_admits_only_what_a_device_decoder_reproduces(reference: ReferenceFixture) -> None:
    files = _variants(reference.images[:8])
    admitted = {name for name, data in files.items() if plain_jpeg(data)}
    expected = {f"plain_{i}.jpg" for i in range(8)} | {"grey.jpg", "corrupt_middle.jpg"}
    assert admitted == expected
    assert not plain_jpeg(files["plain_0.jpg"], size=120)


def test_decode_jpegs_matches_pillow_and_isolates_a_bad_image(reference: ReferenceFixture) -> None:
    files = _variants(reference.images[:8])
    names = ["plain_0.jpg", "grey.jpg", "not_an_image.jpg", "plain_5.jpg", "progressive.jpg"]
    decoded = decode_jpegs([files[name] for name in names], "cpu")
    assert decoded[2] is None  # the bad one, found after the batched call failed; the rest still decoded
    for name, image in zip(names, decoded, strict=True):
        if image is not None:
            assert image.dtype.is_floating_point is False and tuple(image.shape) == (112, 112, 3)
            np.testing.assert_array_equal(image.numpy(), decode_face(files[name]).image)  # bit-identical
    assert decode_jpegs([], "cpu") == []


def _batch(folder: Path, files: dict[str, bytes]) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    names = sorted(files)
    return {
        "image_id": np.array(names, dtype=object),
        "url": np.array([str(folder / n) for n in names], dtype=object),
        "offset": np.full(len(names), -1),
        "length": np.full(len(names), -1),
    }


def test_actor_decoding_gives_the_cpu_paths_rows(
    reference: ReferenceFixture, tmp_path: Path, monkeypatch
) -> None:
    files = _variants(reference.images[:8])
    batch = _batch(tmp_path / "in", files)
    on_cpu = read_and_decode(dict(batch))
    deferred = read_and_decode(dict(batch), defer_jpeg=True)
    left_encoded = set(deferred["image_id"][deferred["jpeg"]])
    assert left_encoded == {name for name, data in files.items() if plain_jpeg(data)}
    assert (
        "pixels" not in deferred
    )  # every row travels as bytes: its JPEG, or the pixels decoded while reading
    for name, data, status in zip(deferred["image_id"], deferred["encoded"], deferred["status"], strict=True):
        if name in left_encoded:
            assert data == files[name]
        else:
            assert len(data) == (112 * 112 * 3 if status == "ok" else 0), name

    actor = ScoreActor(
        str(reference.checkpoint),
        json.loads((reference.path / "config.json").read_text()),
        device="cpu",
        batch_size=3,
    )
    expected, got = actor(on_cpu), actor(deferred)
    assert "encoded" not in got and "pixels" not in got
    for column in ("image_id", "status", "error", "width", "height", "resized"):
        assert list(got[column]) == list(expected[column]), column
    np.testing.assert_array_equal(got["exit_scores"], expected["exit_scores"])  # NaN rows included
    assert set(np.asarray(got["image_id"])[got["device_decoded"]]) == left_encoded

    # A device decoder that refuses a good JPEG (nvJPEG has limits libjpeg has not): the CPU decodes it.

    import fiqa_curator.workers.device_decode

    real = fiqa_curator.workers.device_decode.decode_jpegs
    monkeypatch.setattr(
        fiqa_curator.workers.device_decode,
        "decode_jpegs",
        lambda blobs, device: [None if i == 0 else image for i, image in enumerate(real(blobs, device))],
    )
    refused = actor(deferred)
    np.testing.assert_array_equal(refused["exit_scores"], expected["exit_scores"])
    assert refused["device_decoded"].sum() == got["device_decoded"].sum() - 1
    assert list(refused["status"]) == list(expected["status"])


def test_bf16_autocast_stays_within_its_stated_tolerance(reference: ReferenceFixture) -> None:
    """bf16 keeps 8 mantissa bits: scores move by a little, ranks barely (gpu_check.py states the same
    tolerance for the GPU: max |diff| below 5% of the scores' spread)."""
    loaded = load_model(reference.checkpoint, str(reference.path / "config.json"))
    fp32 = QualityScorer(loaded, device="cpu", precision="fp32").score(reference.images).exit_scores
    bf16 = QualityScorer(loaded, device="cpu", precision="bf16").score(reference.images).exit_scores
    np.testing.assert_allclose(fp32, reference.block_quality, **TOLERANCE)
    assert 0 < np.abs(bf16 - fp32).max() < 0.05 * fp32.std()  # not fp32 in disguise, and close


def test_batch_size_for_memory() -> None:
    megabyte, gigabyte = 1e6, 1e9
    assert batch_size_for_memory(megabyte, 100 * gigabyte) == AUTO_BATCH_CAP  # a big GPU: the cap
    assert batch_size_for_memory(megabyte, 1 * gigabyte) == 672  # 700 fit, rounded down to a multiple of 32
    assert batch_size_for_memory(megabyte, 1 * gigabyte, share=0.25) == 160  # four actors share the GPU
    assert batch_size_for_memory(megabyte, 20 * megabyte) == 14  # fewer than 32 fit: as many as fit
    assert batch_size_for_memory(megabyte, 1 * megabyte) == 1
    for bad in ((0, gigabyte, 1.0), (megabyte, gigabyte, 0.0), (megabyte, gigabyte, 1.5)):
        with pytest.raises(ValueError):
            batch_size_for_memory(bad[0], bad[1], share=bad[2])


def test_auto_batch_size_on_cpu_and_refusals(reference: ReferenceFixture) -> None:
    loaded = load_model(reference.checkpoint, str(reference.path / "config.json"))
    assert QualityScorer(loaded, device="cpu", batch_size="auto").batch_size == CPU_BATCH_SIZE
    with pytest.raises(ValueError, match="batch_size"):
        QualityScorer(loaded, device="cpu", batch_size=0)


def test_precision_is_resolved_and_part_of_the_configuration(reference: ReferenceFixture) -> None:
    loaded = load_model(reference.checkpoint, str(reference.path / "config.json"))
    options = ScoreOptions(input="in", output="out", device="cpu")
    assert scoring_config(loaded, options)["precision"] == "fp32"
    assert (
        scoring_config(loaded, ScoreOptions(input="in", output="out", device="cuda"))["precision"] == "bf16"
    )
    assert (
        scoring_config(loaded, ScoreOptions(input="in", output="out", device="cpu", precision="bf16"))[
            "precision"
        ]
        == "bf16"
    )
    with pytest.raises(ValueError, match="resolve the device"):
        scoring_config(loaded, ScoreOptions(input="in", output="out"))  # "auto" device: not yet known
    with pytest.raises(ValueError, match="--decode device"):
        scoring_config(
            loaded, ScoreOptions(input="in", output="out", device="cpu", decode="device", align="largest")
        )
    assert scoring_device("cpu", None) == "cpu" and scoring_device("cuda", None) == "cuda"
    with pytest.raises(ValueError, match="--device"):
        scoring_device("tpu", None)


def test_autoscaling_gpu_cluster_placement() -> None:
    """A KubeRay GPU group that scales from zero has no GPU when the run starts: with --device cuda and
    --workers the actors ask for GPUs anyway (the autoscaler adds nodes); without --workers it says so."""
    placement = actor_placement({"CPU": 4.0}, device="cuda", workers=4, gpus_per_worker=0.5)
    assert placement.gpu and placement.workers == 4 and placement.gpus_per_worker == 0.5
    with pytest.raises(UserError, match="--workers"):
        actor_placement({"CPU": 4.0}, device="cuda")


@pytest.mark.slow
def test_decode_on_device_through_the_pipeline(
    reference: ReferenceFixture, tmp_path: Path, run_score
) -> None:
    files = _variants(reference.images[:8])
    for name, data in files.items():
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    model = {
        "checkpoint": str(reference.checkpoint),
        "model_config": str(reference.path / "config.json"),
        "batch_size": 4,
        "shard_size": 6,
    }
    _, expected = run_score(tmp_path / "in", tmp_path / "cpu", **model)
    summary, got = run_score(tmp_path / "in", tmp_path / "device", decode="device", **model)
    assert got.keys() == expected.keys() == files.keys()
    for image_id, row in got.items():
        for column in ("status", "error", "width", "height", "resized"):
            assert row[column] == expected[image_id][column], (image_id, column)
        if (
            row["status"] == "ok"
        ):  # same pixels; Ray may batch rows differently, so float-level differences only
            np.testing.assert_allclose(row["exit_scores"], expected[image_id]["exit_scores"], **TOLERANCE)
        else:
            assert row["exit_scores"] is None and row["quality"] is None
    record = json.loads((tmp_path / "device" / "_run.json").read_text())
    assert record["config"]["decode"] == "device" and record["config"]["precision"] == "fp32"
    # 8 plain, grey, corrupt_middle; the chroma-subsampled ones were decoded while reading, on the CPU
    assert record["stages"]["decoded_on_device"] == 10
    assert summary.counts == {"decode_error": 3, "ok": 17}  # truncated, empty, not_an_image

    # precision and decoding are part of the configuration: resuming (or --since) the other way is refused
    with pytest.raises(PlanConflict, match="precision"):
        run_score(tmp_path / "in", tmp_path / "device", decode="device", precision="bf16", **model)
    with pytest.raises(PlanConflict, match="decode"):
        run_score(tmp_path / "in", tmp_path / "device", **model)
