"""`fiqa select` and `fiqa query` end to end, on local folders and on the S3 server."""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from fiqa_curator.flows import table_sql
from fiqa_curator.flows.cli import main
from fiqa_curator.flows.curation import LIST_SCHEMA, select
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from tests.tables import synthetic_table, tied_table


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
    return synthetic_table(ids, status, exits, quality, source=[f"s3://b/{i}" for i in ids])


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


def test_query_prints_and_writes(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
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
    # --out takes what the preview takes: a closing ";" and a trailing comment; any TMPDIR
    monkeypatch.setenv("TMPDIR", str(tmp_path / "it's here"))
    (tmp_path / "it's here").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    for sql in ("SELECT count(*) AS n FROM scores;", "SELECT count(*) AS n FROM scores -- every row"):
        assert main(["query", str(tmp_path / "out"), sql, "--out", str(tmp_path / "n.csv")]) == 0
        assert (tmp_path / "n.csv").read_text().splitlines() == ["n", str(table.num_rows)]
    capsys.readouterr()
    # the preview keeps its first rows and counts the rest (streamed, not gathered)
    assert main(["query", str(tmp_path / "out"), "SELECT image_id FROM scores", "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"{table.num_rows} rows (first 2)" in " ".join(printed.split())  # the title may wrap
    assert sum(image_id in printed for image_id in table.column("image_id").to_pylist()) == 2
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
    assert fs.cat(f"{s3_bucket}/run/counts.csv").decode().splitlines() == ["n", "18"]  # DuckDB's CSV
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


def reference_lists(table, by: str, drop_fraction=None, min_quality=None):
    """The selection computed plainly in Python: (keep, drop, threshold)."""
    rows = table.to_pylist()

    def score(row) -> float:
        if by.startswith("exit_"):
            value = None if row["exit_scores"] is None else row["exit_scores"][int(by[5:]) - 1]
        else:
            value = row[by]
        return math.nan if value is None else float(value)

    scored = sorted(
        (r for r in rows if r["status"] == "ok" and math.isfinite(score(r))),
        key=lambda r: (score(r), r["image_id"]),
    )
    if drop_fraction is not None:
        cut = math.floor(drop_fraction * len(scored) + 1e-9)
        low = {r["image_id"] for r in scored[:cut]}
        threshold = score(scored[cut - 1]) if cut else None
        reason = f"in the lowest {drop_fraction:g} by {by}"
    else:
        low = {r["image_id"] for r in scored if score(r) < min_quality}
        threshold, reason = min_quality, f"{by} < {min_quality:g}"
    keep, drop = [], []
    for row in sorted(rows, key=lambda r: r["image_id"]):
        value = score(row)
        record = {
            "image_id": row["image_id"],
            "source": row["source"],
            "quality": value if math.isfinite(value) else None,
        }
        if row["status"] != "ok":
            drop.append({**record, "reason": f"{row['status']}: {row['error'] or ''}".rstrip(": ")})
        elif not math.isfinite(value):
            drop.append({**record, "reason": f"no finite {by} score"})
        elif row["image_id"] in low:
            drop.append({**record, "reason": reason})
        else:
            keep.append({**record, "reason": "kept"})
    return keep, drop, threshold


@pytest.mark.parametrize(
    ("by", "layout"), [("quality", "ranges"), ("exit_2", "ranges"), ("quality", "mixed")]
)
def test_select_matches_a_plain_reference_through_multi_pass_order_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by: str, layout: str
) -> None:
    """`ranges`: files holding ranges of ids, as fiqa writes shards (the lists are sorted one file at a
    time); `mixed`: files whose ids interleave (one sort over the whole table)."""
    table = tied_table().sort_by("image_id")
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    for number in range(3):
        mixed = table.take(list(range(number, len(table), 3)))
        part = table.slice(number * 100, 100) if layout == "ranges" else mixed
        pq.write_table(part, out / "scores" / f"shard-{number:05d}.parquet")
    (out / "_SUCCESS").write_bytes(b"")
    with table_sql.quality_table(Output(str(out))) as connection:
        in_order = table_sql.files_in_id_order(connection, Output(str(out)))
    assert (in_order is not None) == (layout == "ranges")
    # tiny fetches and histograms: every order statistic takes several narrowing passes
    monkeypatch.setattr(table_sql, "FETCH_LIMIT", 5)
    monkeypatch.setattr(table_sql, "BUCKETS", 4)
    passes: list[int] = []
    original = table_sql._order_statistics

    def counting(*args, **kwargs):
        passes.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(table_sql, "_order_statistics", counting)
    rules = [{"drop_fraction": f} for f in (0.0, 0.1, 0.37, 0.5, 0.93, 1.0)]
    rules += [{"min_quality": m} for m in (0.5, float(np.float32(2 / 3)), -math.inf, math.nan)]
    split_ties = 0
    for rule in rules:
        passes.clear()
        selection = select(str(out), by=by, memory_limit="256MiB", **rule)
        keep, drop, threshold = reference_lists(table, by, **rule)
        lists = {name: out / "curation" / f"{name}.parquet" for name in ("keep", "drop")}
        assert pq.read_table(lists["keep"]).to_pylist() == keep, rule
        assert pq.read_table(lists["drop"]).to_pylist() == drop, rule
        assert all(pq.read_schema(path).remove_metadata().equals(LIST_SCHEMA) for path in lists.values())
        low = sum(r["reason"].startswith(("in the lowest", f"{by} <")) for r in drop)
        written = json.loads((out / "curation" / "selection.json").read_text())
        assert (written["kept"], written["dropped_low_quality"]) == (len(keep), low), rule
        assert written["dropped_unscored"] == len(drop) - low
        if threshold is not None and math.isnan(threshold):
            assert math.isnan(selection.threshold)
        else:
            assert selection.threshold == threshold and written["threshold"] == threshold, rule
        if rule.get("drop_fraction", 0) > 0:
            assert len(passes) >= 2, rule  # a histogram pass, then a narrower one
            dropped_at = any(r["quality"] == threshold and r["reason"].startswith("in the") for r in drop)
            split_ties += dropped_at and any(r["quality"] == threshold for r in keep)
    assert split_ties  # some cut fell inside a run of ties, which image_id had to split


def test_select_refuses_a_bad_memory_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_output(tmp_path / "out", quality_table())
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where DuckDB's spill folders go
    with pytest.raises(UserError, match="memory-limit"):
        select(str(tmp_path / "out"), drop_fraction=0.1, memory_limit="lots")
    assert not (tmp_path / "out" / "curation").exists()
    assert not list((tmp_path / "tmp").iterdir())  # no spill folder left behind
    selection = select(str(tmp_path / "out"), drop_fraction=0.1, memory_limit="200MB")
    assert selection.dropped_low_quality == 1 and not list((tmp_path / "tmp").iterdir())
