"""The model against the official implementation's outputs (shared/fixtures/vitfiqa)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fiqa_curator.workers import QualityScorer, decode_face, load_model, normalize
from tests.conftest import TOLERANCE, ReferenceFixture


def test_every_exit_depth_matches_the_official_block_scores(reference: ReferenceFixture) -> None:
    scorer = QualityScorer(load_model(reference.checkpoint, reference.path / "config.json"), device="cpu")
    depth = reference.config["depth"]
    assert scorer.depth == depth == reference.block_quality.shape[1]
    for exit_depth in range(1, depth + 1):
        result = scorer.score(reference.images, exit_depth=exit_depth)
        assert result.exit_scores.shape == (len(reference.images), exit_depth)
        np.testing.assert_allclose(result.exit_scores, reference.block_quality[:, :exit_depth], **TOLERANCE)
        # the last exit of a pass is the `final` fusion
        np.testing.assert_allclose(
            result.fused["final"], reference.block_quality[:, exit_depth - 1], **TOLERANCE
        )


def test_full_depth_quality_and_embedding_match(reference: ReferenceFixture) -> None:
    loaded = load_model(reference.checkpoint, reference.path / "config.json")
    result = QualityScorer(loaded, device="cpu").score(reference.images, fusion="final", embeddings=True)
    np.testing.assert_allclose(result.quality, reference.quality, **TOLERANCE)
    assert result.embedding is not None
    np.testing.assert_allclose(result.embedding, reference.embedding, **TOLERANCE)


def test_official_forward_signature_matches(reference: ReferenceFixture) -> None:
    loaded = load_model(reference.checkpoint, reference.path / "config.json")
    with torch.inference_mode():
        embedding, quality = loaded.model(normalize(reference.images))
    assert quality.shape == (len(reference.images), 1)
    np.testing.assert_allclose(quality[:, 0].numpy(), reference.quality, **TOLERANCE)
    np.testing.assert_allclose(embedding.numpy(), reference.embedding, **TOLERANCE)


def test_sidecar_config_and_fixture_keys(reference: ReferenceFixture) -> None:
    loaded = load_model(reference.checkpoint)  # config.json beside model.pt is picked up
    for key in ("mode", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        assert getattr(loaded.config, key) == reference.config[key]


def test_scores_do_not_depend_on_batch_composition(reference: ReferenceFixture) -> None:
    loaded = load_model(reference.checkpoint)
    one_by_one = QualityScorer(loaded, device="cpu", batch_size=1).score(reference.images)
    reversed_batch = QualityScorer(loaded, device="cpu", batch_size=3).score(reference.images[::-1].copy())
    np.testing.assert_allclose(one_by_one.exit_scores, reference.block_quality, **TOLERANCE)
    np.testing.assert_allclose(reversed_batch.exit_scores[::-1], reference.block_quality, **TOLERANCE)


@pytest.mark.parametrize("image_format", ["PNG", "TIFF", "BMP", "WEBP"])
def test_lossless_files_through_decoding_match(reference: ReferenceFixture, image_format: str) -> None:
    decoded = []
    for image in reference.images:
        buffer = io.BytesIO()
        options = {"lossless": True} if image_format == "WEBP" else {}
        Image.fromarray(image).save(buffer, format=image_format, **options)
        result = decode_face(buffer.getvalue())
        assert result.ok and not result.resized
        decoded.append(result.image)
    batch = np.stack(decoded)
    np.testing.assert_array_equal(batch, reference.images)
    scores = QualityScorer(load_model(reference.checkpoint), device="cpu").score(batch, embeddings=True)
    np.testing.assert_allclose(scores.exit_scores, reference.block_quality, **TOLERANCE)
    np.testing.assert_allclose(scores.embedding, reference.embedding, **TOLERANCE)
