"""The contracts in schemas/: the batch placeholders survive a trip through the quality table and back, the
run record reads what it writes (and refuses what it is not), face ids split back into their items."""

from __future__ import annotations

import numpy as np
import pytest

from fiqa_curator.schemas import SCORE_COLUMNS, Status, UserError, build_quality_table
from fiqa_curator.schemas.batch import (
    EMBEDDING,
    READ_COLUMNS,
    SCORED_COLUMNS,
    batch_from_table,
    face_image_id,
    item_of,
)
from fiqa_curator.schemas.layout import RunRecord, StageFigures


def _batch(count: int, depth: int, width: int) -> dict[str, np.ndarray]:
    """A writer batch with every status: the ok rows scored, the others left at their placeholders."""
    statuses = [Status.OK, Status.DECODE_ERROR, Status.OK, Status.NO_FACE, Status.READ_ERROR][:count]
    ok = np.array([s == Status.OK for s in statuses])
    rng = np.random.default_rng(0)
    batch = {name: column.empty(count) for name, column in READ_COLUMNS.items()}
    batch.update({name: column.empty(count, depth) for name, column in SCORED_COLUMNS.items()})
    batch[EMBEDDING.name] = EMBEDDING.empty(count, width)
    batch.update(
        image_id=np.array([f"img{i}" for i in range(count)], dtype=object),
        source=np.array([f"file:///in/img{i}" for i in range(count)], dtype=object),
        identity=np.array(["a", None, "b", None, "a"][:count], dtype=object),
        status=np.array([str(s) for s in statuses], dtype=object),
        error=np.array(["" if s == Status.OK else f"why {s}" for s in statuses], dtype=object),
        run_id=np.array(["run-1"] * count, dtype=object),
    )
    batch["width"][ok], batch["height"][ok], batch["byte_size"][ok] = 112, 112, 4000
    batch["face_index"][2], batch["faces"][2] = 0, 1
    batch["face_box"][2] = [1, 2, 3, 4]
    batch["face_confidence"][2] = 1.5
    batch["exit_scores"][ok] = rng.normal(size=(int(ok.sum()), depth))
    for name in SCORE_COLUMNS:
        batch[name][ok] = rng.normal(size=int(ok.sum()))
    batch[EMBEDDING.name][ok] = rng.normal(size=(int(ok.sum()), width))
    return batch


def test_a_batch_survives_the_table_and_back() -> None:
    depth, width = 3, 8
    batch = _batch(5, depth, width)
    table = build_quality_table(
        {**batch, "model_sha256": "abc", "shard": "shard-00000"}, metadata={"fusion": "fw"}
    )
    assert table.column("error").null_count == 2 and table.column("exit_scores").null_count == 3
    back = batch_from_table(table, {"exit_scores": depth, "embedding": width})
    assert set(back) == set(batch) - {"item_id", "item_rows"}  # bookkeeping is not in the table
    for name, values in back.items():
        expected = batch[name]
        assert values.dtype == expected.dtype or values.dtype == object, name
        if values.dtype.kind == "f":
            np.testing.assert_array_equal(
                values, expected.astype(values.dtype), err_msg=name
            )  # NaN == NaN here
        else:
            assert values.tolist() == expected.tolist(), name


def test_a_file_whose_rows_all_failed_keeps_its_widths() -> None:
    batch = {name: values[1:2] for name, values in _batch(5, 4, 6).items()}  # one decode_error row
    table = build_quality_table({**batch, "model_sha256": "abc", "shard": "s"}, metadata={})
    back = batch_from_table(table, {"exit_scores": 4, "embedding": 6})
    assert back["exit_scores"].shape == (1, 4) and np.isnan(back["exit_scores"]).all()
    assert back["embedding"].shape == (1, 6)


def test_the_run_record_reads_what_it_writes_and_refuses_what_it_is_not() -> None:
    record = RunRecord(
        output="file:///out",
        run_id="r1",
        counts={"ok": 3},
        total_rows=3,
        config={"model_config": {"depth": 2}},
        stages=StageFigures(rows_by_node={"n1": 3}, actor_nodes=["n1"]),
    )
    again = RunRecord.from_json(record.to_json())
    assert again == record and again.model_config_dict == {"depth": 2}
    assert RunRecord.from_json(b'{"config": {}}').total_rows == 0  # a partial record: defaults
    with pytest.raises(UserError, match=r"_run\.json is not a fiqa run record"):
        RunRecord.from_json(b"{not json")
    with pytest.raises(UserError, match=r"_run\.json is not a fiqa run record"):
        RunRecord.from_json(b'{"total_rows": "many"}')


def test_face_ids_split_back_into_their_items() -> None:
    assert item_of(face_image_id("a/b#c.jpg", 2), "all") == ("a/b#c.jpg", 2)
    assert item_of("photo.jpg", "all") == ("photo.jpg", 0)  # no face found: the item's own id
    assert item_of("x#face1", "largest") == ("x#face1", 0)  # only --align all makes face ids
