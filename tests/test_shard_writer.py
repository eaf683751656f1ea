"""The driver's writer (`flows.shard_writer`) on its own: rows in any order and any batching, repeats,
--align all items, carried rows beside new ones. Fast: no model, no Ray (the pipeline tests run it for
real)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fiqa_curator.flows.plan import make_plan
from fiqa_curator.flows.shard_writer import ShardWriter
from fiqa_curator.flows.sources import InputItem
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.batch import BATCH_COLUMNS, EMBEDDING, READ_LOCATION, RUN_ID, face_image_id
from fiqa_curator.schemas.layout import shard_file
from fiqa_curator.schemas.status import Status

DEPTH = 3
CONFIG = {"model_sha256": "sha", "exit_depth": DEPTH, "fusion": "fw", "fusion_weights": [1 / 6, 2 / 6, 3 / 6]}


def _plan(count: int, shard_size: int):
    items = [InputItem(f"img_{n}", f"file:///in/img_{n}", f"file:///in/img_{n}") for n in range(count)]
    return make_plan("in", "folder", items, shard_size, {"exit_depth": DEPTH})


def _batch(
    rows: list[tuple[str, str]],
    *,
    score: float = 0.5,
    item_ids: list[str] | None = None,
    item_rows: list[int] | None = None,
    node: str = "node-a",
) -> dict[str, np.ndarray]:
    """Scored rows as the scoring stage hands them to the driver: (image_id, shard) pairs; each row's
    exit scores are `score`, `score` + 1, ... so that a test can tell deliveries apart."""
    count = len(rows)
    skip = (*READ_LOCATION, EMBEDDING.name, RUN_ID.name)
    batch = {
        name: column.empty(count, DEPTH if column.width == 0 else None)
        for name, column in BATCH_COLUMNS.items()
        if name not in skip
    }
    batch["image_id"] = np.array([image_id for image_id, _ in rows], dtype=object)
    batch["source"] = np.array([f"file:///in/{image_id}" for image_id, _ in rows], dtype=object)
    batch["shard"] = np.array([shard for _, shard in rows], dtype=object)
    batch["item_id"] = np.array(item_ids or [image_id for image_id, _ in rows], dtype=object)
    batch["item_rows"] = np.array(item_rows or [1] * count, dtype=np.int64)
    batch["status"] = np.full(count, Status.OK.value, dtype=object)
    batch["exit_scores"] = np.tile(np.arange(DEPTH, dtype=np.float32) + score, (count, 1))
    batch["quality"] = np.full(count, score, dtype=np.float32)
    batch["scored_on"] = np.full(count, node, dtype=object)
    return batch


def _table(tmp_path: Path, shard: str) -> list[dict]:
    return pq.read_table(tmp_path / "out" / shard_file(shard)).to_pylist()


def test_shards_commit_when_their_last_row_arrives_in_any_order_and_batching(tmp_path: Path) -> None:
    plan = _plan(7, 3)  # shard-00000: img_0 img_1 img_2 | shard-00001: img_3 img_4 img_5 | shard-00002: img_6
    writer = ShardWriter(Output(str(tmp_path / "out")), plan, [0, 1, 2], run_id="run-1", config=CONFIG)
    assert writer.missing() == {"shard-00000": 3, "shard-00001": 3, "shard-00002": 1}
    writer.add(_batch([("img_5", "shard-00001"), ("img_2", "shard-00000")]))  # one batch, two shards
    writer.add(_batch([("img_0", "shard-00000"), ("img_3", "shard-00001")], node="node-b"))
    assert not writer.committed and writer.missing() == {"shard-00000": 1, "shard-00001": 1, "shard-00002": 1}
    writer.add(_batch([("img_1", "shard-00000")]))
    assert list(writer.committed) == ["shard-00000"]  # committed the moment its last row came
    writer.add(_batch([("img_6", "shard-00002"), ("img_4", "shard-00001")]))
    assert set(writer.committed) == {"shard-00000", "shard-00001", "shard-00002"}
    assert writer.missing() == {} and writer.rows_by_node == {"node-a": 5, "node-b": 2}
    rows = _table(tmp_path, "shard-00001")
    assert [row["image_id"] for row in rows] == ["img_3", "img_4", "img_5"]  # image_id order
    assert {row["run_id"] for row in rows} == {"run-1"} and {row["shard"] for row in rows} == {"shard-00001"}
    assert rows[0]["exit_scores"] == pytest.approx([0.5, 1.5, 2.5]) and rows[0]["status"] == "ok"


def test_a_row_delivered_twice_is_written_once_and_late_repeats_are_ignored(tmp_path: Path) -> None:
    plan = _plan(3, 3)
    writer = ShardWriter(Output(str(tmp_path / "out")), plan, [0], run_id="run-1", config=CONFIG)
    writer.add(_batch([("img_0", "shard-00000"), ("img_1", "shard-00000")], score=0.25))
    writer.add(_batch([("img_1", "shard-00000")], score=0.75))  # a retried task: three rows, two distinct
    assert not writer.committed and writer.missing() == {"shard-00000": 1}
    writer.add(_batch([("img_2", "shard-00000"), ("img_0", "shard-00000")], score=0.75))
    assert list(writer.committed) == ["shard-00000"]
    committed = (tmp_path / "out" / shard_file("shard-00000")).read_bytes()
    rows = _table(tmp_path, "shard-00000")
    assert [(row["image_id"], row["quality"]) for row in rows] == [
        ("img_0", 0.25),  # the first delivery wins
        ("img_1", 0.25),
        ("img_2", 0.75),
    ]
    writer.add(_batch([("img_1", "shard-00000")], score=0.5))  # after the commit: already there
    assert (tmp_path / "out" / shard_file("shard-00000")).read_bytes() == committed
    with pytest.raises(RuntimeError, match="unplanned shard"):
        writer.add(_batch([("img_9", "shard-00007")]))


def test_an_item_with_several_faces_is_complete_when_all_its_faces_arrived(tmp_path: Path) -> None:
    """--align all: an item yields one row per face (`item_rows`); a photo without a face keeps one row."""
    plan = _plan(2, 2)
    writer = ShardWriter(Output(str(tmp_path / "out")), plan, [0], run_id="run-1", config=CONFIG)
    faces = [face_image_id("img_0", n) for n in range(3)]
    writer.add(_batch([(faces[2], "shard-00000")], item_ids=["img_0"], item_rows=[3]))
    writer.add(_batch([("img_1", "shard-00000")]))  # one row per item so far: 2 rows for 2 items
    assert writer.missing() == {"shard-00000": 1}  # img_0 has 1 of its 3 faces
    writer.add(
        _batch(
            [(faces[0], "shard-00000"), (faces[2], "shard-00000")], item_ids=["img_0"] * 2, item_rows=[3, 3]
        )
    )
    assert not writer.committed  # a repeated face does not stand in for the missing one
    writer.add(_batch([(faces[1], "shard-00000")], item_ids=["img_0"], item_rows=[3]))
    assert list(writer.committed) == ["shard-00000"]
    assert [row["image_id"] for row in _table(tmp_path, "shard-00000")] == [*faces, "img_1"]


def test_carried_rows_keep_their_run_beside_rows_scored_now(tmp_path: Path) -> None:
    """--since: rows rebuilt from PREVIOUS bring their own `run_id` and no bookkeeping columns; rows scored
    now in the same shard get this run's id."""
    plan = _plan(3, 3)
    writer = ShardWriter(Output(str(tmp_path / "out")), plan, [0], run_id="night-2", config=CONFIG)
    carried = _batch([("img_0", "shard-00000"), ("img_2", "shard-00000")], score=0.1)
    for bookkeeping in ("item_id", "item_rows", "scored_on", "device_decoded"):
        del carried[bookkeeping]
    carried[RUN_ID.name] = np.array(["night-1", "night-1"], dtype=object)
    writer.add(carried)
    writer.add(_batch([("img_1", "shard-00000")], score=0.9))
    rows = _table(tmp_path, "shard-00000")
    assert [(row["image_id"], row["run_id"], row["quality"]) for row in rows] == [
        ("img_0", "night-1", pytest.approx(0.1)),
        ("img_1", "night-2", pytest.approx(0.9)),
        ("img_2", "night-1", pytest.approx(0.1)),
    ]
    assert writer.rows_by_node == {"node-a": 1}
