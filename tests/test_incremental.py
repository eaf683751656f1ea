"""`fiqa score --since PREVIOUS`: a second run scores only new and changed images and carries the rest."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiqa_curator.flows.incremental import IncrementalError
from fiqa_curator.workers import QualityScorer, load_model
from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT

pytestmark = pytest.mark.slow


def _faces(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)


def test_second_run_scores_only_new_and_changed_images(tmp_path: Path, run_score) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for index, image in enumerate(_faces(12, 0)):
        Image.fromarray(image).save(folder / f"img_{index:02d}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    first, before = run_score(folder, tmp_path / "night1", shard_size=5)
    assert first.scored_now == 13 and first.carried_over == 0

    # the corpus changes: two new images, one rewritten, one deleted
    new_images = _faces(3, 1)
    Image.fromarray(new_images[0]).save(folder / "img_90.png")
    Image.fromarray(new_images[1]).save(folder / "img_91.png")
    time.sleep(0.01)
    Image.fromarray(new_images[2]).save(folder / "img_03.png")
    stat = (folder / "img_03.png").stat()
    os.utime(folder / "img_03.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a clearly newer mtime
    (folder / "img_07.png").unlink()

    second, after = run_score(folder, tmp_path / "night2", shard_size=5, since=str(tmp_path / "night1"))
    assert (
        second.scored_now == 3 and second.carried_over == 11
    )  # img_90, img_91, img_03 scored; 11 of 13 carried
    current = {p.name for p in folder.iterdir()}
    assert set(after) == current  # every current image exactly once, the deleted one gone
    assert second.total_rows == len(current) == 14
    for image_id in current - {"img_90.png", "img_91.png", "img_03.png"}:
        assert after[image_id]["run_id"] == before[image_id]["run_id"] != second.run_id  # carried, as it was
        for column in ("status", "quality", "quality_fw", "exit_scores", "source", "byte_size", "error"):
            assert after[image_id][column] == before[image_id][column], (image_id, column)
    for image_id in ("img_90.png", "img_91.png", "img_03.png"):
        assert after[image_id]["run_id"] == second.run_id
    expected = QualityScorer(load_model(BUNDLED_CHECKPOINT), device="cpu").score(new_images)
    np.testing.assert_allclose(
        [after[i]["quality"] for i in ("img_90.png", "img_91.png", "img_03.png")],
        expected.quality,
        rtol=1e-5,
        atol=1e-6,
    )
    assert after["img_03.png"]["quality"] != before["img_03.png"]["quality"]  # the newest score, not the old

    # nothing changed since night 2: night 3 scores nothing and is still the whole table
    third, again = run_score(folder, tmp_path / "night3", shard_size=5, since=str(tmp_path / "night2"))
    assert third.scored_now == 0 and third.carried_over == 14 and set(again) == current

    # another configuration cannot be carried over into one table
    with pytest.raises(IncrementalError, match="another configuration"):
        run_score(folder, tmp_path / "night4", shard_size=5, exit_depth=4, since=str(tmp_path / "night1"))
    with pytest.raises(IncrementalError, match="not a fiqa OUTPUT"):
        run_score(folder, tmp_path / "night5", since=str(tmp_path / "nothing-here"))


def test_nightly_run_after_a_configuration_change_scores_everything(
    tmp_path: Path, prefect_harness, ray_cluster
) -> None:
    """A new model, exit depth or precision between two nights: the previous night's rows cannot be carried,
    so the night scores every image (with a warning) rather than failing every night until someone comes."""
    from fiqa_curator.flows.nightly import nightly_score

    nightly_score = nightly_score.with_options(
        retries=0
    )  # a failure fails the test now, not after 2 x 10 min
    folder = tmp_path / "in"
    folder.mkdir()
    for index, image in enumerate(_faces(6, 2)):
        Image.fromarray(image).save(folder / f"img_{index}.png")
    root = tmp_path / "nightly"
    first = nightly_score(str(folder), str(root), run_for="2026-11-28", scoring={"shard_size": 4})
    same = nightly_score(str(folder), str(root), run_for="2026-11-29", scoring={"shard_size": 4})
    assert first["scored_now"] == 6 and same["scored_now"] == 0 and same["carried_over"] == 6
    changed = nightly_score(
        str(folder), str(root), run_for="2026-11-30", scoring={"shard_size": 4, "exit_depth": 6}
    )
    assert changed["scored_now"] == 6 and changed["carried_over"] == 0 and changed["rows"] == 6
    import pyarrow.parquet as pq

    table = pq.read_table(root / "2026-11-30" / "scores")
    assert set(table.column("exit_depth").to_pylist()) == {6}  # no row of the old configuration mixed in
