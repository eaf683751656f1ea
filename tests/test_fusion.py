"""EX-FIQA fusion weights and fused scores."""

from __future__ import annotations

import numpy as np
import pytest

from fiqa_curator.workers import Fusion, QualityScorer, load_model, parse_fusion
from tests.conftest import ReferenceFixture


def test_builtin_weights() -> None:
    np.testing.assert_allclose(parse_fusion("f").weights(4), [0.25] * 4)
    np.testing.assert_allclose(parse_fusion("fw").weights(4), np.array([1, 2, 3, 4]) / 10)
    np.testing.assert_allclose(parse_fusion("FW").weights(12), np.arange(1, 13) / 78)
    np.testing.assert_allclose(parse_fusion("final").weights(3), [0, 0, 1])
    np.testing.assert_allclose(parse_fusion("fw").weights(1), [1.0])


def test_user_weights_are_normalised_and_checked() -> None:
    fusion = parse_fusion("1,1,2")
    assert fusion == Fusion("w", (1.0, 1.0, 2.0))
    np.testing.assert_allclose(fusion.weights(3), [0.25, 0.25, 0.5])
    assert parse_fusion("w:0,1") == Fusion("w", (0.0, 1.0))
    assert parse_fusion([0.5, 0.5]).weights(2).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="3 fusion weights given for 4 exits"):
        fusion.weights(4)
    for bad in ("1,-1", "0,0", "nan,1", "median", ""):
        with pytest.raises(ValueError):
            parse_fusion(bad)


def test_fuse_is_the_weighted_sum() -> None:
    scores = np.array([[1.0, 2.0, 4.0], [0.0, -3.0, 3.0]], dtype=np.float32)
    np.testing.assert_allclose(parse_fusion("f").fuse(scores), [7 / 3, 0.0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        parse_fusion("fw").fuse(scores), [(1 + 4 + 12) / 6, (0 - 6 + 9) / 6], rtol=1e-6
    )
    np.testing.assert_allclose(parse_fusion("final").fuse(scores), [4.0, 3.0])


def test_score_result_names_every_fusion(reference: ReferenceFixture) -> None:
    scorer = QualityScorer(load_model(reference.checkpoint), device="cpu")
    exit_depth = 5
    result = scorer.score(reference.images, exit_depth=exit_depth, fusion="2,0,0,0,2")
    assert result.primary == "w"
    assert set(result.fused) == {"w", "f", "fw", "final"}
    expected = reference.block_quality[:, :exit_depth]
    np.testing.assert_allclose(result.fused["f"], expected.mean(axis=1), atol=2e-5, rtol=1e-3)
    fw = expected @ (np.arange(1, 6) / 15)
    np.testing.assert_allclose(result.fused["fw"], fw, atol=2e-5, rtol=1e-3)
    np.testing.assert_allclose(result.quality, (expected[:, 0] + expected[:, 4]) / 2, atol=2e-5, rtol=1e-3)
    np.testing.assert_allclose(result.weights["fw"], np.arange(1, 6) / 15)
    assert result.fusion_specs["w"] == "2,0,0,0,2"
    default = scorer.score(reference.images)
    assert default.primary == "fw" and default.weights["fw"].shape == (reference.config["depth"],)
