"""`fiqa score --since PREVIOUS`: a second run scores only new and changed images and carries the rest.

The fast tests check the Arrow matching (`unchanged_items`, `carried_batches`, `carry_over`) on a PREVIOUS
OUTPUT written as a run writes it, against a plain Python reference of the documented rules; the slow ones
run the whole flow twice.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fiqa_curator.flows.incremental import (
    IncrementalError,
    carried_batches,
    unchanged_items,
)
from fiqa_curator.flows.plan import make_plan, save_plan
from fiqa_curator.flows.sources import InputItem
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas import build_quality_table
from fiqa_curator.schemas.batch import item_of
from fiqa_curator.schemas.layout import LISTING_FILE, shard_file, shard_name
from fiqa_curator.schemas.status import Status
from fiqa_curator.workers import QualityScorer, load_model
from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT


def _faces(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- the Arrow matching, against a plain Python reference (fast: no model, no Ray) ---------------------
DEPTH = 3
CONFIG = {
    "model_sha256": "sha",
    "model_config": {"embed_dim": 8},
    "exit_depth": DEPTH,
    "fusion": "fw",
    "fusion_weights": [1 / 6, 2 / 6, 3 / 6],
    "align": None,
}
KEY = ("url", "offset", "length", "size", "version")


def _shard_items(plan, index: int) -> list[InputItem]:
    return [InputItem(**row) for row in plan.shard_listing(index).to_pylist()]


def _item(
    image_id: str, *, url: str = "", offset: int = -1, size: int = 100, version: str = "v1"
) -> InputItem:
    """A file, or with `offset` a member of the tar `url`."""
    url = url or f"file:///in/{image_id}"
    source = url if offset < 0 else f"{url}#{image_id}"
    length = size if offset >= 0 else -1
    return InputItem(image_id, source, url, offset, length, None, size, version)


def _write_previous(
    root: Path,
    items: list[InputItem],
    *,
    config: dict = CONFIG,
    shard_size: int = 3,
    faces: dict[str, int] | None = None,
    failed: set[str] = frozenset(),
    unscored: set[int] = frozenset(),
) -> Output:
    """A PREVIOUS OUTPUT written as a run writes it: plan and listing (flows.plan), one quality-table file per
    shard (build_quality_table). `faces` (--align all): an item's faces, a `#faceN` row each, none: one row
    under the item's own id with `no_face`; `failed`: items whose last row is a read_error; `unscored`:
    shards without a file (an interrupted run)."""
    output = Output(str(root))
    plan = make_plan(str(root / "in"), "folder", items, shard_size, config)
    save_plan(output, plan)
    rng = np.random.default_rng(len(items))
    for index in range(plan.shard_count):
        if index in unscored:
            continue
        ids, sources, statuses = [], [], []
        for item in _shard_items(plan, index):
            count = (faces or {}).get(item.image_id)
            rows = (
                [item.image_id]
                if count is None or count == 0
                else [f"{item.image_id}#face{k}" for k in range(count)]
            )
            status = [Status.NO_FACE.value if count == 0 else Status.OK.value] * len(rows)
            if item.image_id in failed:
                status[-1] = Status.READ_ERROR.value
            ids += rows
            sources += [item.source] * len(rows)
            statuses += status
        count = len(ids)
        columns = {
            "image_id": ids,
            "source": sources,
            "status": statuses,
            "error": ["" if s == Status.OK.value else s for s in statuses],
            "byte_size": np.full(count, 100),
            "width": np.full(count, 112),
            "height": np.full(count, 112),
            "resized": np.zeros(count, dtype=bool),
            "exit_scores": rng.random((count, DEPTH), dtype=np.float32),
            **{
                name: rng.random(count, dtype=np.float32)
                for name in ("quality_final", "quality_f", "quality_fw")
            },
            "quality": rng.random(count, dtype=np.float32),
            "model_sha256": "sha",
            "run_id": f"night1-{index}",
            "shard": shard_name(index),
        }
        table = build_quality_table(columns, metadata={"fusion": "fw"})
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        output.commit_bytes(shard_file(shard_name(index)), buffer.getvalue().to_pybytes())
    return output


def _reference(
    root: Path, items: list[InputItem], shard_of: dict[str, str], align: str | None
) -> tuple[set[str], dict[str, tuple]]:
    """The documented rules in plain Python: (unchanged image ids, carried rows by image_id)."""
    listing = pq.read_table(root / LISTING_FILE).to_pylist()
    before = {row["image_id"]: tuple(row[k] for k in KEY) for row in listing}
    unchanged = {
        item.image_id
        for item in items
        if item.version and before.get(item.image_id) == tuple(getattr(item, k) for k in KEY)
    }
    scores = root / "scores"
    rows = pq.read_table(scores).to_pylist() if scores.is_dir() else []
    rows = [row for row in rows if item_of(row["image_id"], align)[0] in unchanged]
    retried = {item_of(row["image_id"], align)[0] for row in rows if row["status"] == Status.READ_ERROR}
    rows = [row for row in rows if item_of(row["image_id"], align)[0] not in retried]
    counts = Counter(item_of(row["image_id"], align)[0] for row in rows)
    carried = {}
    for row in rows:
        owner = item_of(row["image_id"], align)[0]
        carried[row["image_id"]] = (
            owner,
            counts[owner],
            shard_of[owner],
            row["run_id"],
            row["status"],
            row["quality"],
        )
    return unchanged, carried


def _carried(batches) -> dict[str, tuple]:
    """Writer batches as rows by image_id, in `_reference`'s form; an image twice is a failure."""
    carried = {}
    for batch in batches:
        assert batch["exit_scores"].shape == (len(batch["image_id"]), DEPTH)
        for i, image_id in enumerate(batch["image_id"]):
            assert image_id not in carried
            quality = float(batch["quality"][i])
            carried[image_id] = (
                batch["item_id"][i],
                int(batch["item_rows"][i]),
                batch["shard"][i],
                batch["run_id"][i],
                batch["status"][i],
                None if np.isnan(quality) else quality,
            )
    return carried


def _shards(plan) -> dict[str, str]:
    return {item.image_id: shard_name(i) for i in range(plan.shard_count) for item in _shard_items(plan, i)}


# PREVIOUS's listing (shards of 3: a b c | d e f | g h i | j k m | n), and what became of each image
PREVIOUS = [
    _item("a"),
    _item("b"),
    _item("c"),
    _item("d", version=""),  # a store that reports no version: never carried
    _item("e"),
    _item("f", url="file:///in/t.tar", offset=512),
    _item("g"),  # a read_error in PREVIOUS: rescored
    _item("h"),  # deleted
    _item("i"),
    _item("j"),
    _item("k"),
    _item("m"),
    _item("n"),  # its shard has no file in PREVIOUS (interrupted): no row to carry
]
CURRENT = [
    _item("a"),
    _item("b", size=101),  # changed size
    _item("c", version="v2"),  # changed version
    _item("d", version=""),
    _item("e", url="file:///moved/e"),  # moved
    _item("f", url="file:///in/t.tar", offset=1024),  # another byte range
    _item("g"),
    _item("i"),
    _item("j"),
    _item("k"),
    _item("m"),
    _item("n"),
    _item("new"),  # missing from PREVIOUS
]
FACES = {"a": 1, "i": 3, "j": 2, "k": 0, "m": 1}  # --align all: j's second face a read error, k no face


@pytest.mark.parametrize("align", [None, "all"])
def test_unchanged_and_carried_rows_follow_the_documented_rules(tmp_path: Path, align: str | None) -> None:
    config = {**CONFIG, "align": align}
    previous = _write_previous(
        tmp_path / "prev",
        PREVIOUS,
        config=config,
        faces=FACES if align == "all" else None,
        failed={"g", "j"},
        unscored={4},
    )
    plan = make_plan(
        "in", "folder", CURRENT, 4, config
    )  # other shards than PREVIOUS's: a b c d | e f g i | ...
    items = plan.pending_listing(range(plan.shard_count))
    assert items.column("image_id").to_pylist() == plan.listing.column("image_id").to_pylist()
    unchanged = unchanged_items(previous, plan, items)
    assert set(unchanged.column("image_id").to_pylist()) == {"a", "g", "i", "j", "k", "m", "n"}

    carried = _carried(carried_batches(previous, unchanged, config=config))
    expected_unchanged, expected = _reference(tmp_path / "prev", CURRENT, _shards(plan), align)
    assert set(unchanged.column("image_id").to_pylist()) == expected_unchanged
    assert carried == expected
    assert {row[0] for row in carried.values()} == {"a", "i", "k", "m"}  # g, j: read errors; n: no row
    if align == "all":
        assert set(carried) == {"a#face0", "i#face0", "i#face1", "i#face2", "k", "m#face0"}
        assert {row[1] for key, row in carried.items() if key.startswith("i#")} == {3}
        assert carried["k"][4] == Status.NO_FACE
    else:
        assert set(carried) == {"a", "i", "k", "m"}
    assert {row[0]: row[2] for row in carried.values()} == {
        "a": "shard-00000",
        "i": "shard-00001",
        "k": "shard-00002",
        "m": "shard-00002",
    }  # the current plan's shards
    assert carried["a#face0" if align == "all" else "a"][3] == "night1-0"  # PREVIOUS's run_id

    # whatever order the unchanged items come in
    backwards = carried_batches(
        previous, unchanged.take(pa.array(range(unchanged.num_rows - 1, -1, -1))), config=config
    )
    assert _carried(backwards) == expected


@pytest.mark.parametrize("seed", range(6))
def test_carried_rows_match_the_reference_on_random_changes(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    align = "all" if seed % 2 else None
    config = {**CONFIG, "align": align}
    before = [
        _item(f"img_{n:03d}", size=int(rng.integers(50, 60)), version=str(rng.integers(3))) for n in range(80)
    ]
    faces = {item.image_id: int(rng.integers(0, 4)) for item in before} if align else None
    failed = {item.image_id for item in before if rng.random() < 0.1}
    shard_size = int(rng.integers(1, 12))
    unscored = {int(rng.integers(0, (len(before) + shard_size - 1) // shard_size))}
    previous = _write_previous(
        tmp_path / "prev",
        before,
        config=config,
        shard_size=shard_size,
        faces=faces,
        failed=failed,
        unscored=unscored,
    )
    current = []
    for item in before:
        change = rng.integers(8)
        if change == 1:
            item = _item(item.image_id, size=item.size + 1, version=item.version)
        elif change == 2:
            item = _item(item.image_id, size=item.size, version=item.version + "x")
        elif change == 3:
            item = _item(item.image_id, size=item.size, version="")
        elif change == 4:
            item = _item(
                item.image_id, url="file:///moved/" + item.image_id, size=item.size, version=item.version
            )
        elif change == 5:
            continue  # deleted
        current.append(item)
    current += [_item(f"img_{n:03d}x") for n in range(5)]  # new, between the old ids
    plan = make_plan("in", "folder", current, int(rng.integers(1, 12)), config)
    pending = sorted(rng.choice(plan.shard_count, size=max(1, plan.shard_count // 2), replace=False).tolist())

    unchanged = unchanged_items(previous, plan, plan.pending_listing(pending))
    expected_unchanged, expected = _reference(
        tmp_path / "prev", [item for i in pending for item in _shard_items(plan, i)], _shards(plan), align
    )
    assert set(unchanged.column("image_id").to_pylist()) == expected_unchanged
    assert _carried(carried_batches(previous, unchanged, config=config)) == expected
    assert expected  # the case carries something


def test_carry_over_gives_the_writer_whole_shards_of_previous_rows(tmp_path: Path) -> None:
    """Through `execution.carry_over` into the real ShardWriter: the shards whose items are all unchanged are
    committed from PREVIOUS's rows (and their run_id); the pending shards only; the rest is left to score."""
    from fiqa_curator.flows.execution import carry_over
    from fiqa_curator.flows.shard_writer import ShardWriter

    before = [_item(f"img_{n}") for n in range(7)]
    _write_previous(tmp_path / "prev", before, shard_size=3)
    current = [*before, _item("img_7")]  # shards of 2: 0 1 | 2 3 | 4 5 | 6 7
    plan = make_plan("in", "folder", current, 2, CONFIG)
    output = Output(str(tmp_path / "out"))
    pending = [1, 2, 3]  # shard 0 committed by an earlier attempt of this run
    writer = ShardWriter(output, plan, pending, run_id="night2", config=CONFIG)
    options = SimpleNamespace(since=str(tmp_path / "prev"), storage_options={})
    carried = carry_over(options, plan, plan.pending_listing(pending), CONFIG, writer)
    assert carried.to_pylist() == ["img_2", "img_3", "img_4", "img_5", "img_6"]  # each once, as Arrow
    assert list(writer.committed) == ["shard-00001", "shard-00002"]
    assert writer.missing() == {"shard-00003": 1}  # img_7 is new
    written = pq.read_table(tmp_path / "out" / "scores").to_pylist()
    old = {row["image_id"]: row for row in pq.read_table(tmp_path / "prev" / "scores").to_pylist()}
    assert [row["image_id"] for row in written] == ["img_2", "img_3", "img_4", "img_5"]
    for row in written:
        assert row["shard"] == ("shard-00001" if row["image_id"] in ("img_2", "img_3") else "shard-00002")
        assert {k: v for k, v in row.items() if k != "shard"} == {
            k: v for k, v in old[row["image_id"]].items() if k != "shard"
        }


def test_a_previous_output_without_its_listing_is_refused(tmp_path: Path) -> None:
    previous = _write_previous(tmp_path / "prev", [_item("a")])
    (tmp_path / "prev" / LISTING_FILE).unlink()
    plan = make_plan("in", "folder", [_item("a")], 3, CONFIG)
    with pytest.raises(IncrementalError, match="listing"):
        unchanged_items(previous, plan, plan.pending_listing([0]))


def test_a_key_column_null_on_both_sides_counts_as_the_same(tmp_path: Path) -> None:
    """As the Python comparison it replaced (None == None): a listing written by another producer may hold
    nulls; a null against a value is a change."""
    from fiqa_curator.flows.sources import ITEM_SCHEMA

    previous = _write_previous(tmp_path / "prev", [_item("a"), _item("b"), _item("c")])
    plan = make_plan("in", "folder", [_item("a"), _item("b"), _item("c")], 3, CONFIG)
    rows = [{**_item(name).as_dict(), "offset": None} for name in ("a", "b")] + [_item("c").as_dict()]
    pq.write_table(pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), tmp_path / "prev" / LISTING_FILE)
    now = [
        {**_item("a").as_dict(), "offset": None},
        _item("b").as_dict(),
        {**_item("c").as_dict(), "size": None},
    ]
    unchanged = unchanged_items(previous, plan, pa.Table.from_pylist(now, schema=ITEM_SCHEMA))
    assert unchanged.column("image_id").to_pylist() == ["a"]
