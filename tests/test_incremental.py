"""`fiqa score --since PREVIOUS`: a second run scores only new and changed images and carries the rest.

The fast tests check the shard-by-shard matching (`carry_by_shard`, `execution.carry_over` into the real
ShardWriter) on a PREVIOUS OUTPUT written as a run writes it, against a plain Python reference of the
documented rules; the slow ones run the whole flow twice.
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

from fiqa_curator.flows import plan as plan_module
from fiqa_curator.flows.incremental import IncrementalError, ShardCarry, carry_by_shard
from fiqa_curator.flows.plan import make_plan, save_plan, shard_task
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
def test_second_run_scores_only_new_and_changed_images(tmp_path: Path, run_score, monkeypatch) -> None:
    import socket
    import tempfile

    from fiqa_curator.flows.shard_writer import ShardWriter

    read_back: list[str] = []  # shards whose carried rows waited on local disk for their scored rows
    original = ShardWriter._with_set_aside

    def recorded(self, shard, merged):
        read_back.append(shard)
        return original(self, shard, merged)

    monkeypatch.setattr(ShardWriter, "_with_set_aside", recorded)
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
    # img_00-04 | img_05 img_06 img_08 img_09 img_10 | img_11 ... : shard 0 holds img_03, carried in part
    assert "shard-00000" in read_back
    mine = f"fiqa-plan-{socket.gethostname()}-{os.getpid()}-"
    assert not [name for name in os.listdir(tempfile.gettempdir()) if name.startswith(mine)]  # removed
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


def _carried(shards: list[ShardCarry]) -> dict[str, tuple]:
    """carry_by_shard's rows by image_id, in `_reference`'s form; an image twice is a failure."""
    carried = {}
    for shard in shards:
        assert shard.carried == len(set(shard.rows.column("item_id").to_pylist()))
        for row in shard.rows.to_pylist():
            assert row["image_id"] not in carried
            assert row["shard"] == shard_name(shard.index)
            assert row["exit_scores"] is None or len(row["exit_scores"]) == DEPTH
            carried[row["image_id"]] = (
                row["item_id"],
                row["item_rows"],
                row["shard"],
                row["run_id"],
                row["status"],
                row["quality"],
            )
    return carried


def _check_to_score(plan, shards: list[ShardCarry], pending) -> None:
    """Every pending shard answered once, in order; its images either carried or still to score."""
    assert [shard.index for shard in shards] == sorted(pending)
    for shard in shards:
        ids = plan.shard_listing(shard.index).column("image_id").to_pylist()
        carried = set(shard.rows.column("item_id").to_pylist())
        assert shard.items == len(ids)
        assert shard.to_score.to_pylist() == [i for i in ids if i not in carried]


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
    shards = list(carry_by_shard(previous, plan, range(plan.shard_count), plan.listing))
    _check_to_score(plan, shards, range(plan.shard_count))
    carried = _carried(shards)
    expected_unchanged, expected = _reference(tmp_path / "prev", CURRENT, _shards(plan), align)
    assert expected_unchanged == {"a", "g", "i", "j", "k", "m", "n"}
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


@pytest.mark.parametrize("seed", range(6))
def test_carried_rows_match_the_reference_on_random_changes(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both listings saved in row groups of a shard (as at scale, where a group holds many shards): the
    merge of the two listings crosses group boundaries on both sides, with shards of other sizes."""
    monkeypatch.setattr(plan_module, "LISTING_GROUP_MIN_ROWS", 1)
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

    save_plan(Output(str(tmp_path / "now")), plan)
    shards = list(carry_by_shard(previous, plan, pending, str(tmp_path / "now" / LISTING_FILE)))
    _check_to_score(plan, shards, pending)
    _, expected = _reference(
        tmp_path / "prev", [item for i in pending for item in _shard_items(plan, i)], _shards(plan), align
    )
    assert _carried(shards) == expected
    assert expected  # the case carries something


def test_carry_over_gives_the_writer_whole_shards_and_sets_aside_the_rest(tmp_path: Path) -> None:
    """Through `execution.carry_over` into the real ShardWriter: the shards whose items are all unchanged are
    committed from PREVIOUS's rows (and their run_id); a shard carried in part waits, its carried rows in a
    local file, until its scored rows arrive; the pending shards only."""
    from fiqa_curator.flows.execution import carry_over
    from fiqa_curator.flows.shard_writer import ShardWriter

    before = [_item(f"img_{n}") for n in range(7)]
    _write_previous(tmp_path / "prev", before, shard_size=3)
    current = [*before, _item("img_7")]  # shards of 2: 0 1 | 2 3 | 4 5 | 6 7
    plan = make_plan("in", "folder", current, 2, CONFIG)
    output = Output(str(tmp_path / "out"))
    save_plan(output, plan)
    plan.listing = None  # as a run holds it: the listing read from OUTPUT
    pending = [1, 2, 3]  # shard 0 committed by an earlier attempt of this run
    writer = ShardWriter(output, plan, pending, run_id="night2", config=CONFIG)
    options = SimpleNamespace(since=str(tmp_path / "prev"), output=str(tmp_path / "out"), storage_options={})
    tasks, carried = carry_over(options, plan, pending, writer)
    assert carried == 5
    assert tasks == [shard_task(plan, 3, pa.array(["img_7"]))]  # img_7 is new
    assert tasks[0]["only"] == '["img_7"]' and (tasks[0]["start"], tasks[0]["stop"]) == (6, 8)
    assert list(writer.committed) == ["shard-00001", "shard-00002"]
    assert writer.missing() == {"shard-00003": 1}
    aside, items = writer.set_aside["shard-00003"]
    assert items == 1 and Path(aside).is_file()  # on disk, not in memory
    assert not Path(aside).is_relative_to(tmp_path / "out")  # a local file of the driver's, not OUTPUT's

    # img_7's scored row arrives: the shard is committed with img_6 read back from the local file
    scored = {
        "image_id": np.array(["img_7"], dtype=object),
        "source": np.array(["file:///in/img_7"], dtype=object),
        "status": np.array([Status.OK.value], dtype=object),
        "error": np.array([""], dtype=object),
        "byte_size": np.array([100]),
        "width": np.array([112]),
        "height": np.array([112]),
        "resized": np.array([False]),
        "exit_scores": np.full((1, DEPTH), 0.5, dtype=np.float32),
        "quality": np.array([0.5], dtype=np.float32),
        "shard": np.array(["shard-00003"], dtype=object),
    }
    writer.add(scored)
    assert list(writer.committed) == ["shard-00001", "shard-00002", "shard-00003"] and not writer.missing()
    assert not Path(aside).exists() and not writer.set_aside
    written = pq.read_table(tmp_path / "out" / "scores").to_pylist()
    old = {row["image_id"]: row for row in pq.read_table(tmp_path / "prev" / "scores").to_pylist()}
    assert [row["image_id"] for row in written] == [f"img_{n}" for n in range(2, 8)]
    for row in written[:-1]:
        assert row["shard"] == plan_shard(row["image_id"])
        assert {k: v for k, v in row.items() if k != "shard"} == {
            k: v for k, v in old[row["image_id"]].items() if k != "shard"
        }
    assert written[-1]["run_id"] == "night2" and written[-1]["quality"] == 0.5
    writer.close()


def plan_shard(image_id: str) -> str:
    """The shard of `img_N` in shards of 2."""
    return shard_name(int(image_id.removeprefix("img_")) // 2)


def test_previous_files_are_read_once_each_and_the_listings_a_group_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keeps --since's memory flat: each file of PREVIOUS read once, and no more of either listing
    held than a row group or two (here groups of 4 rows, 40 images in shards of 4 and 3)."""
    from fiqa_curator.flows import incremental

    monkeypatch.setattr(plan_module, "LISTING_GROUP_MIN_ROWS", 1)
    before = [_item(f"img_{n:02d}") for n in range(40)]
    previous = _write_previous(tmp_path / "prev", before, shard_size=4)
    plan = make_plan("in", "folder", before, 3, CONFIG)
    save_plan(Output(str(tmp_path / "now")), plan)
    reads: Counter[str] = Counter()
    original = Output.read_bytes

    def counted(self, relative):
        reads[relative] += 1
        return original(self, relative)

    monkeypatch.setattr(Output, "read_bytes", counted)
    held: list[int] = []
    cursor = incremental._ListingCursor

    class Watched(cursor):
        def _more(self, skip_before: int = -1) -> bool:
            more = super()._more(skip_before)
            held.append(self._buffer.num_rows)
            return more

    monkeypatch.setattr(incremental, "_ListingCursor", Watched)
    shards = list(
        carry_by_shard(previous, plan, range(plan.shard_count), str(tmp_path / "now" / LISTING_FILE))
    )
    assert sum(shard.carried for shard in shards) == 40
    files = {name: count for name, count in reads.items() if name.startswith("scores/")}
    assert len(files) == 10 and set(files.values()) == {1}
    assert held and max(held) <= 2 * 4


def test_the_listing_cursor_skips_unread_the_groups_before_a_gap(tmp_path: Path) -> None:
    """A resumed --since run asks for its last shards only: the row groups before them are not read, and
    the rows held stay a group or two (groups of 10 rows here)."""
    from fiqa_curator.flows import incremental

    listing = pa.Table.from_pylist([_item(f"img_{n:03d}").as_dict() for n in range(200)])
    read: list[int] = []
    groups = []
    for group in incremental.listing_groups(listing, group_rows=10):
        groups.append(group)
    for number, group in enumerate(groups):
        original = group.read
        group.read = lambda original=original, number=number: read.append(number) or original()
    cursor = incremental._ListingCursor(iter(groups))
    held = []
    for start, stop in ((0, 5), (5, 12), (183, 190), (190, 200)):
        rows = cursor.rows(start, stop)
        assert rows.column("image_id").to_pylist() == [f"img_{n:03d}" for n in range(start, stop)]
        held.append(cursor._buffer.num_rows)
    assert read == [0, 1, 18, 19] and max(held) <= 20
    with pytest.raises(RuntimeError, match="holds 200 rows"):
        cursor.rows(200, 201)


def test_the_writer_removes_carried_rows_it_never_committed(tmp_path: Path) -> None:
    """A run that stops before a shard carried in part is complete leaves no file of its carried rows."""
    from fiqa_curator.flows.execution import carry_over
    from fiqa_curator.flows.shard_writer import ShardWriter

    before = [_item(f"img_{n}") for n in range(4)]
    _write_previous(tmp_path / "prev", before, shard_size=4)
    plan = make_plan("in", "folder", [*before, _item("img_4")], 5, CONFIG)
    options = SimpleNamespace(since=str(tmp_path / "prev"), output=str(tmp_path / "out"), storage_options={})
    for local in (tmp_path / "local", None):  # a folder given (the run's), or the writer's own
        if local is not None:
            local.mkdir()
        writer = ShardWriter(
            Output(str(tmp_path / "out")),
            plan,
            [0],
            run_id="r",
            config=CONFIG,
            local_folder=local and str(local),
        )
        tasks, carried = carry_over(options, plan, [0], writer)
        assert carried == 4 and tasks[0]["only"] == '["img_4"]'
        ((path, items),) = writer.set_aside.values()
        assert items == 4 and Path(path).is_file()
        if local is not None:
            assert Path(path).parent == local
        writer.close()
        assert not Path(path).exists() and not writer.set_aside
        assert local is None or local.is_dir()  # a folder given is its owner's to remove
        assert local is not None or not Path(path).parent.exists()


def test_a_previous_output_without_its_listing_is_refused(tmp_path: Path) -> None:
    previous = _write_previous(tmp_path / "prev", [_item("a")])
    (tmp_path / "prev" / LISTING_FILE).unlink()
    plan = make_plan("in", "folder", [_item("a")], 3, CONFIG)
    with pytest.raises(IncrementalError, match="listing"):
        list(carry_by_shard(previous, plan, [0], plan.listing))


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
    (shard,) = carry_by_shard(previous, plan, [0], pa.Table.from_pylist(now, schema=ITEM_SCHEMA))
    assert shard.rows.column("item_id").to_pylist() == ["a"] and shard.to_score.to_pylist() == ["b", "c"]


def test_carry_over_between_outputs_on_s3(tmp_path: Path, s3_server, s3_bucket: str, monkeypatch) -> None:
    """PREVIOUS and OUTPUT on a real S3 server: both listings read a row group at a time through fsspec,
    PREVIOUS's files fetched, the carried shards committed there; the same answer as on local disk."""
    import s3fs

    from fiqa_curator.flows.execution import carry_over
    from fiqa_curator.flows.shard_writer import ShardWriter

    monkeypatch.setattr(plan_module, "LISTING_GROUP_MIN_ROWS", 1)
    before = [_item(f"img_{n:02d}") for n in range(30)]
    _write_previous(tmp_path / "prev", before, shard_size=4, failed={"img_05"}, unscored={6})
    current = [*before[:10], _item("img_10", size=7), *before[11:], _item("img_30")]
    plan = make_plan("in", "folder", current, 5, CONFIG)
    options = s3_server.storage_options
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.put(str(tmp_path / "prev"), f"{s3_bucket}/prev", recursive=True)
    answers = {}
    for where in ("local", "s3"):
        root = f"s3://{s3_bucket}" if where == "s3" else str(tmp_path)
        output = Output(f"{root}/out", options if where == "s3" else None)
        save_plan(output, plan)
        run = replace_listing(plan)
        pending = list(range(plan.shard_count))
        writer = ShardWriter(output, run, pending, run_id="night2", config=CONFIG)
        settings = SimpleNamespace(
            since=f"{root}/prev", output=output.url, storage_options=options if where == "s3" else {}
        )
        tasks, carried = carry_over(settings, run, pending, writer)
        writer.close()
        answers[where] = (tasks, carried, list(writer.committed), sorted(output.list("scores")))
    assert answers["s3"] == answers["local"]
    tasks, carried, committed, files = answers["s3"]
    # img_05: a read error; img_10: changed; img_24-27: PREVIOUS's shard 6 never written; img_30: new
    assert carried == 31 - 7
    assert [(task["shard"], task["only"]) for task in tasks] == [
        ("shard-00001", '["img_05"]'),
        ("shard-00002", '["img_10"]'),
        ("shard-00004", '["img_24"]'),
        ("shard-00005", '["img_25", "img_26", "img_27"]'),
        ("shard-00006", ""),  # img_30 alone: nothing carried, the whole shard to score
    ]
    assert committed == ["shard-00000", "shard-00003"]
    assert files == ["shard-00000.parquet", "shard-00003.parquet"]


def replace_listing(plan):
    """The plan as a run holds it once planned: without its listing (read from OUTPUT)."""
    from dataclasses import replace

    return replace(plan, listing=None)
