"""`fiqa select` and `fiqa query` end to end, on local folders and on the S3 server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from fiqa_curator.flows.cli import main
from fiqa_curator.schemas import build_quality_table


def quality_table(count: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    exits = rng.normal(size=(count, 3)).astype(np.float32)
    quality = exits @ np.array([1, 2, 3], dtype=np.float32) / 6
    quality[[4, 5]] = quality[3]  # a tie at the bottom: broken by image_id
    quality[3] = quality.min() - 1
    quality[4] = quality[5] = quality[3]
    status = ["ok"] * count
    status[7], status[8] = "decode_error", "too_large"
    ids = [f"img_{i:02d}.jpg" for i in range(count)]
    return build_quality_table(
        {
            "image_id": ids,
            "source": [f"s3://b/{i}" for i in ids],
            "status": status,
            "error": ["" if s == "ok" else "broken" for s in status],
            "byte_size": [10] * count,
            "width": [112] * count,
            "height": [112] * count,
            "resized": [False] * count,
            "exit_scores": exits,
            "quality_final": exits[:, 2],
            "quality_f": exits.mean(1),
            "quality_fw": quality,
            "quality": quality,
            "model_sha256": "m",
            "run_id": "r",
            "shard": "shard-00000",
        },
        metadata={"fusion": "fw"},
    )


def write_output(folder: Path, table) -> None:
    (folder / "scores").mkdir(parents=True)
    pq.write_table(table.slice(0, 10), folder / "scores" / "shard-00000.parquet")
    pq.write_table(table.slice(10), folder / "scores" / "shard-00001.parquet")
    (folder / "_SUCCESS").write_bytes(b"")


def test_select_by_drop_fraction_with_ties_and_failures(tmp_path: Path, capsys) -> None:
    table = quality_table()
    write_output(tmp_path / "out", table)
    assert main(["select", str(tmp_path / "out"), "--drop-fraction", "0.125"]) == 0  # 18 scored -> drop 2
    printed = capsys.readouterr().out
    keep = pq.read_table(tmp_path / "out" / "curation" / "keep.parquet").to_pylist()
    drop = pq.read_table(tmp_path / "out" / "curation" / "drop.parquet").to_pylist()
    assert len(keep) == 16 and len(drop) == 4 and len(keep) + len(drop) == table.num_rows
    low = [r["image_id"] for r in drop if r["reason"].startswith("in the lowest")]
    assert low == ["img_03.jpg", "img_04.jpg"]  # three tie at the bottom: the two first ids go
    unscored = {r["image_id"]: r["reason"] for r in drop if not r["reason"].startswith("in the lowest")}
    assert unscored == {"img_07.jpg": "decode_error: broken", "img_08.jpg": "too_large: broken"}
    selection = json.loads((tmp_path / "out" / "curation" / "selection.json").read_text())
    assert (
        selection["kept"] == 16
        and selection["dropped_low_quality"] == 2
        and selection["dropped_unscored"] == 2
    )
    assert selection["threshold"] == pytest.approx(table.column("quality")[3].as_py())
    assert "threshold" in printed and "keep 16" in printed
    assert main(["select", str(tmp_path / "out"), "--drop-fraction", "0.125"]) == 0  # deterministic
    assert pq.read_table(tmp_path / "out" / "curation" / "keep.parquet").to_pylist() == keep


def test_select_by_min_quality_and_by_exit(tmp_path: Path, capsys) -> None:
    table = quality_table()
    write_output(tmp_path / "out", table)
    exit_two = {r["image_id"]: r["exit_scores"] for r in table.to_pylist()}
    assert main(["select", str(tmp_path / "out"), "--min-quality", "0", "--by", "exit_2"]) == 0
    drop = pq.read_table(tmp_path / "out" / "curation" / "drop.parquet").to_pylist()
    expected = {i for i, s in exit_two.items() if s is not None and s[1] < 0}
    assert {r["image_id"] for r in drop if r["reason"] == "exit_2 < 0"} == expected
    assert all(r["quality"] < 0 for r in drop if r["reason"] == "exit_2 < 0")
    capsys.readouterr()
    assert main(["select", str(tmp_path / "out"), "--drop-fraction", "0.1", "--by", "exit_9"]) == 2
    assert "exits 1..3" in capsys.readouterr().out


def test_query_prints_and_writes(tmp_path: Path, capsys) -> None:
    table = quality_table()
    write_output(tmp_path / "out", table)
    assert (
        main(["query", str(tmp_path / "out"), "SELECT status, count(*) AS n FROM scores GROUP BY status"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "decode_error" in printed and "18" in printed
    assert (
        main(
            [
                "query",
                str(tmp_path / "out"),
                "SELECT image_id, exit_scores[3] AS e3 FROM scores WHERE status = 'ok' ORDER BY image_id",
                "--out",
                str(tmp_path / "e3.parquet"),
            ]
        )
        == 0
    )
    result = pq.read_table(tmp_path / "e3.parquet").to_pylist()
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert len(result) == 18
    for row in result:
        assert row["e3"] == pytest.approx(rows[row["image_id"]]["exit_scores"][2])
    assert main(["query", str(tmp_path / "out"), "SELECT nope FROM scores"]) == 2
    assert "query failed" in capsys.readouterr().out


@pytest.mark.s3
def test_select_and_query_on_s3(s3_server, s3_bucket: str, capsys) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    table = quality_table(seed=3)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs.pipe(f"{s3_bucket}/run/scores/shard-00000.parquet", buffer.getvalue())
    fs.pipe(f"{s3_bucket}/run/_SUCCESS", b"")
    options = json.dumps(s3_server.storage_options)
    url = f"s3://{s3_bucket}/run"
    assert main(["select", url, "--drop-fraction", "0.5", "--storage-options", options]) == 0
    keep = pq.read_table(io.BytesIO(fs.cat(f"{s3_bucket}/run/curation/keep.parquet"))).to_pylist()
    assert len(keep) == 9
    assert (
        main(
            [
                "query",
                url,
                "SELECT count(*) AS n FROM scores WHERE quality IS NOT NULL",
                "--storage-options",
                options,
                "--out",
                f"{url}/counts.csv",
            ]
        )
        == 0
    )
    assert fs.cat(f"{s3_bucket}/run/counts.csv").decode().splitlines() == ['"n"', "18"]
    assert main(["report", url, "--storage-options", options]) == 0  # the report works on object storage too
    page = fs.cat(f"{s3_bucket}/run/report/index.html").decode()
    assert '<section id="thresholds">' in page and "decode_error" in page
    assert s3_server.storage_options["secret"] not in capsys.readouterr().out


def test_select_refuses_an_incomplete_run(tmp_path: Path, capsys) -> None:
    write_output(tmp_path / "out", quality_table())
    (tmp_path / "out" / "_SUCCESS").unlink()
    assert main(["select", str(tmp_path / "out"), "--drop-fraction", "0.1"]) == 2
    assert "incomplete" in capsys.readouterr().out
    assert not (tmp_path / "out" / "curation").exists()
