"""`fiqa report`: the page is parsed back and every section checked against numbers computed here."""

from __future__ import annotations

import io
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fiqa_curator.flows.cli import main
from fiqa_curator.schemas import build_quality_table
from tests.tables import synthetic_table

XSS_NAME = "<script>alert(1)</script>.jpg"


class Page(HTMLParser):
    """Sections, tables (by id: rows of cell texts), image sources and any script tags of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.scripts = 0
        self.lists: dict[str, list[str]] = {}  # <ul id=...>: the text of each item
        self.paragraphs: set[str] = set()  # ids of <p> (a table with no rows is a <p> "none")
        self._list: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self.sections.append(attributes["id"])
        elif tag == "table":
            self._table = attributes.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attributes["src"])
        elif tag == "script":
            self.scripts += 1
        elif tag == "ul" and attributes.get("id"):
            self._list = attributes["id"]
            self.lists[self._list] = []
        elif tag == "li" and self._list:
            self.lists[self._list].append("")
        elif tag == "p" and attributes.get("id"):
            self.paragraphs.add(attributes["id"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "ul":
            self._list = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        elif self._list and self.lists[self._list]:
            self.lists[self._list][-1] += data


def make_output(folder: Path, count: int = 60) -> dict:
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    ids = [f"img_{i:03d}.png" for i in range(count - 1)] + [XSS_NAME]
    for image_id in ids:  # the XSS name holds a "/": a folder "<script>alert(1)<" and a file "script>.jpg"
        (images / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(
            images / image_id, format="PNG"
        )
    exits = rng.normal(size=(count, 4)).astype(np.float32)
    quality = (exits @ np.arange(1, 5, dtype=np.float32) / 10).astype(np.float32)
    status = ["ok"] * count
    status[3], status[4], status[5] = "decode_error", "decode_error", "read_error"
    identity = [f"person{i % 7}" for i in range(count)]
    identity[0] = "<b>bold</b>"
    table = build_quality_table(
        {
            "image_id": ids,
            "source": [str(images / i) for i in ids],
            "identity": identity,
            "status": status,
            "error": ["" if s == "ok" else f"broken {XSS_NAME}" for s in status],
            "byte_size": [1] * count,
            "width": [112] * (count - 5) + [300] * 5,
            "height": [112] * (count - 5) + [300] * 5,
            "resized": [False] * (count - 5) + [True] * 5,
            "exit_scores": exits,
            "quality_final": exits[:, 3],
            "quality_f": exits.mean(1),
            "quality_fw": quality,
            "quality": quality,
            "model_sha256": "abc123",
            "run_id": "r1",
            "shard": "shard-00000",
        },
        metadata={"fusion": "fw"},
    )
    out = folder / "out"
    (out / "scores").mkdir(parents=True)
    pq.write_table(table, out / "scores" / "shard-00000.parquet")
    (out / "_plan").mkdir()
    pq.write_table(
        pa.table(
            {
                "image_id": ids,
                "url": [str(images / i) for i in ids],
                "offset": [-1] * count,
                "length": [-1] * count,
            }
        ),
        out / "_plan" / "listing.parquet",
    )
    (out / "_run.json").write_text('{"config": {"model_sha256": "abc123", "exit_depth": 4, "fusion": "fw"}}')
    ok = np.array([s == "ok" for s in status])
    return {"out": out, "quality": quality[ok], "status": status, "ids": ids, "identity": identity, "ok": ok}


def test_report_sections_numbers_and_escaping(tmp_path: Path, capsys) -> None:
    data = make_output(tmp_path)
    assert main(["report", str(data["out"])]) == 0
    assert "report:" in capsys.readouterr().out
    text = (data["out"] / "report" / "index.html").read_text()
    page = Page()
    page.feed(text)
    assert page.sections == [
        "summary",
        "run",
        "status",
        "distribution",
        "agreement",
        "size",
        "thresholds",
        "galleries",
        "identities",
    ]
    assert (
        page.scripts == 0
        and "<script>alert(1)" not in text
        and "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in text
    )
    assert "<b>bold</b>" not in text
    assert all(src.startswith("data:image/png;base64,") for src in page.images)  # nothing external
    assert dict(page.tables["status-table"][1:]) == {"decode_error": "2", "ok": "57", "read_error": "1"}
    assert {row[1] for row in page.tables["failure-table"][1:]} == {
        data["ids"][3],
        data["ids"][4],
        data["ids"][5],
    }
    quality = data["quality"]
    for row in page.tables["threshold-table"][1:]:
        q = float(row[0])
        value = np.quantile(quality.astype(np.float64), q)
        assert float(row[1]) == pytest.approx(value, abs=1e-4)
        assert int(row[2]) == int(np.sum(quality < value))
    overlap = {row[0]: float(row[2]) for row in page.tables["overlap-table"][1:]}
    assert set(overlap) == {"exit 1", "exit 2", "exit 3", "exit 4"} and all(
        0 <= v <= 1 for v in overlap.values()
    )
    size = {row[0]: row for row in page.tables["size-table"][1:]}
    assert size["resized"][1] == "5" and size["not resized"][1] == "52"
    # identities: counted over scored images, threshold = the 0.1 quantile
    ok_identity = np.array(data["identity"])[data["ok"]]
    threshold = np.quantile(quality.astype(np.float64), 0.1)
    below = {p: int(np.sum((ok_identity == p) & (quality < threshold))) for p in set(ok_identity)}
    images = {p: int(np.sum(ok_identity == p)) for p in set(ok_identity)}
    expected_few = sorted(p for p in images if images[p] - below[p] < 2)
    assert [row[0] for row in page.tables["identity-few"][1:]] == expected_few
    assert page.tables["identity-summary"][1][0] == str(len(images))
    # the summary a data lead reads first: images, failures by kind, the threshold and what it drops
    summary = page.lists["summary-list"]
    threshold_value = float(np.quantile(quality.astype(np.float64), 0.1))
    assert summary[0] == "60 images, 57 scored"
    assert summary[1] == "failures: decode_error 2, read_error 1"
    assert (
        f"quality < {threshold_value:.4f} drops {int(np.sum(quality < threshold_value))} scored" in summary[2]
    )
    assert "exit depth used: 4" in summary[3]
    assert all(row and all(cell for cell in row) for row in page.tables["run-table"])  # no empty header row
    thumbnails = [src for src in page.images if len(src) < 60_000]
    assert len(thumbnails) >= 3 * 8  # three galleries of eight previews
    decoded = Image.open(io.BytesIO(__import__("base64").b64decode(thumbnails[-1].split(",", 1)[1])))
    assert decoded.size == (112, 112)


@pytest.mark.browser
def test_report_in_a_real_headless_browser(tmp_path: Path) -> None:
    from tests.browser import load_page

    data = make_output(tmp_path)
    _wide_evaluation(data["out"])
    assert main(["report", str(data["out"])]) == 0
    page = (data["out"] / "report" / "index.html").resolve()
    load = load_page(page.as_uri())
    # at the browser's 1280 px nothing runs past the right edge (the EDC figure is 1650 px wide)
    assert load.viewport_width == 1280
    assert load.past_right_edge == [] and load.page_width <= load.viewport_width
    assert load.console_errors == []
    assert load.dialogs == []  # the <script>alert(1)</script> file name never ran
    assert [u for u in load.requests if not u.startswith(("file:", "data:"))] == []  # no external requests
    assert load.requests and load.requests[0] == page.as_uri()
    assert load.screenshot.startswith(b"\x89PNG")
    (tmp_path / "report.png").write_bytes(load.screenshot)
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.width >= 1000 and shot.height > 1000


def _wide_evaluation(out: Path) -> None:
    """An evaluation beside the table as `fiqa evaluate --output OUT/evaluation` writes it, with an EDC
    figure as wide as a three-operating-point one (1650 px)."""
    import json

    folder = out / "evaluation"
    folder.mkdir()
    Image.new("RGB", (1650, 440), "white").save(folder / "edc.png")
    points = {"0.001": {"pauc": 0.12}, "0.0001": {"pauc": 0.2}}
    result = {
        "protocol": "erc",
        "pairs": 10,
        "pairs_used": 10,
        "discard_limit": 0.3,
        "methods": {"quality": points, "exit_1": {p: {"pauc": v["pauc"] + 0.1} for p, v in points.items()}},
        "advisor": {
            "operating_point": "0.001",
            "recommended": {"exit_depth": 3, "option": "fw@3", "pauc": 0.12, "compute_saved": 0.25},
            "best": {"option": "fw@4", "pauc": 0.11},
        },
    }
    (folder / "result.json").write_text(json.dumps(result))


def test_report_summary_names_the_advisor(tmp_path: Path) -> None:
    data = make_output(tmp_path)
    _wide_evaluation(data["out"])
    assert main(["report", str(data["out"])]) == 0
    page = Page()
    page.feed((data["out"] / "report" / "index.html").read_text())
    assert page.sections[0] == "summary" and page.sections[-1] == "evaluation"
    assert page.lists["summary-list"][-1] == "evaluation advisor: exit depth 3 with fw@3"
    assert "order-dependent" not in page.paragraphs  # the result says nothing of ties
    import json

    result_file = data["out"] / "evaluation" / "result.json"
    result = json.loads(result_file.read_text())
    result["order_dependent"] = {"discard_limit": 0.3, "methods": {"exit_1": {"pairs": 4, "boundaries": []}}}
    result_file.write_text(json.dumps(result))
    assert main(["report", str(data["out"])]) == 0
    text = (data["out"] / "report" / "index.html").read_text()
    assert "For 1 of 2 methods the pAUC depends on the order of the pairs file" in text


def test_report_says_none_and_draws_no_degenerate_size_plot(tmp_path: Path) -> None:
    """Every image the same size, no failures, no identities: sentences, not empty tables or a log axis
    over a single value."""
    count = 20
    exits = np.random.default_rng(1).normal(size=(count, 2)).astype(np.float32)
    ids = [f"a{i:02d}.jpg" for i in range(count)]
    table = synthetic_table(ids, ["ok"] * count, exits, exits.mean(1))
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    pq.write_table(table, out / "scores" / "shard-00000.parquet")
    assert main(["report", str(out)]) == 0
    text = (out / "report" / "index.html").read_text()
    page = Page()
    page.feed(text)
    assert "failure-table" in page.paragraphs and "failure-table" not in page.tables
    assert page.lists["summary-list"][1] == "failures: none"
    assert "identities" not in page.sections
    assert "the same size (12,544 pixels, 112x112)" in text
    assert 'alt="quality versus image size"' not in text  # no scatter over a single x value
    assert page.tables["size-table"][1][:2] == ["not resized", "20"]


def test_report_figures_in_bounded_passes_match_numpy(tmp_path: Path, monkeypatch) -> None:
    """Thresholds, galleries, failures and identity statistics equal what numpy/pandas compute over the
    whole table, when every bounded path is forced: order statistics narrowed over several histogram
    passes (heavy ties), the agreement on a sample, identity lists cut."""
    import pandas as pd

    from fiqa_curator.flows import report_data, table_sql
    from fiqa_curator.flows.storage import Output

    monkeypatch.setattr(table_sql, "FETCH_LIMIT", 40)
    monkeypatch.setattr(table_sql, "BUCKETS", 8)
    monkeypatch.setattr(report_data, "SAMPLE_ROWS", 500)
    monkeypatch.setattr(report_data, "IDENTITY_LIST", 3)
    rng = np.random.default_rng(7)
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    frames = []
    for shard in range(3):
        n = 1000
        ids = [f"s{shard}/i{i:04d}.jpg" for i in range(n)]
        exits = np.round(rng.normal(size=(n, 3)), 1).astype(np.float32)  # heavy ties
        quality = np.round(exits.mean(1), 1).astype(np.float32)
        status = np.where(rng.random(n) < 0.05, "decode_error", "ok").astype(object)
        status[rng.random(n) < 0.02] = "read_error"
        quality[(status == "ok") & (rng.random(n) < 0.01)] = np.nan  # a broken score on an ok row
        identity = [f"p{int(x)}" for x in rng.integers(0, 40, n)]
        table = synthetic_table(
            ids,
            status,
            exits,
            quality,
            identity=identity,
            width=rng.integers(50, 400, n),
            height=rng.integers(50, 400, n),
            resized=rng.random(n) < 0.3,
            quality_f=quality,
            shard=f"shard-{shard:05d}",
        )
        pq.write_table(table, out / "scores" / f"shard-{shard:05d}.parquet")
        frames.append(table.drop_columns(["exit_scores"]).to_pandas())
    whole = pd.concat(frames).sort_values("image_id", kind="stable").reset_index(drop=True)
    data = report_data.collect(Output(str(out)))

    scored = whole[(whole.status == "ok") & np.isfinite(whole.quality.astype(float))]
    quality = scored.quality.to_numpy(np.float64)
    ids = scored.image_id.to_numpy(object)
    assert data.rows == len(whole) and data.scored == len(scored)
    assert data.counts == {k: int(v) for k, v in whole.status.value_counts().sort_index().items()}
    for (q, value, dropped), level in zip(data.thresholds, report_data.QUANTILES, strict=True):
        assert q == f"{level:g}" and value == float(np.quantile(quality, level))  # exact, not approximate
        assert dropped == int(np.sum(quality < value))
    order = np.lexsort((ids, quality))
    assert [i for i, _ in data.galleries[0][1]] == list(ids[order[:8]])
    assert [i for i, _ in data.galleries[1][1]] == list(ids[order[::-1][:8]])
    near = np.argsort(np.abs(quality - data.threshold), kind="stable")[:8]
    assert [i for i, _ in data.galleries[2][1]] == list(ids[near])
    failed = whole[whole.status != "ok"]
    expected_failures = [
        (status, image_id) for status, group in failed.groupby("status") for image_id in group.image_id[:5]
    ]
    assert [(s, i) for s, i, _ in data.failures] == expected_failures
    # numpy's histograms to the count: these scores sit on a 0.1 grid, many of them on bin edges
    assert np.array_equal(data.quality_histogram.counts, np.histogram(quality, 50)[0])
    assert np.array_equal(data.quality_histogram.edges, np.histogram(quality, 50)[1])
    from fiqa_curator.schemas.quality_table import exit_score_matrix

    every = pq.read_table(out / "scores")
    exits = exit_score_matrix(every)[np.isin(every.column("image_id").to_numpy(), ids)]
    for k, histogram in enumerate(data.exit_histograms):
        assert np.array_equal(histogram.counts, np.histogram(exits[:, k], 30)[0]), k

    # the agreement's sample: 500 scored rows, in image_id order, the same rows every time
    assert data.agreement.sampled == 500 and list(data.sample.ids) == sorted(data.sample.ids)
    assert set(data.sample.ids) <= set(ids)
    assert list(report_data.collect(Output(str(out))).sample.ids) == list(data.sample.ids)
    # identities over the scored rows, with the threshold; lists cut to 3 names, counts complete
    per = scored.assign(below=quality < data.threshold).groupby("identity")
    images, below = per.size(), per.below.sum()
    few = sorted(images.index[(images - below) < 2])
    mostly = sorted(images.index[below > images / 2])
    identities = data.identities
    assert identities.count == len(images) and identities.median_images == float(images.median())
    assert identities.too_few_count == len(few) and [r[0] for r in identities.too_few] == few[:3]
    assert identities.mostly_below_count == len(mostly)
    assert [r[0] for r in identities.mostly_below] == mostly[:3]


def test_memory_limit_is_parsed_and_refused_when_unreadable(tmp_path: Path, capsys) -> None:
    from fiqa_curator.flows.table_sql import machine_memory, memory_limit_bytes

    assert memory_limit_bytes("2GB") == 2 * 10**9 and memory_limit_bytes("512MiB") == 512 * 2**20
    assert memory_limit_bytes("10%") == int(0.1 * machine_memory())
    assert memory_limit_bytes(None) == int(0.25 * machine_memory())
    # a container's cgroup limit counts when lower than the machine's memory; "max" means none
    from fiqa_curator.flows import table_sql

    limit_file = tmp_path / "memory.max"
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for text, expected in (("1073741824\n", min(physical, 2**30)), ("max\n", physical)):
        limit_file.write_text(text)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(table_sql, "CGROUP_LIMITS", (str(limit_file),))
            assert machine_memory() == expected
    data = make_output(tmp_path)
    assert main(["report", str(data["out"]), "--memory-limit", "lots"]) == 2
    assert "--memory-limit must look like" in capsys.readouterr().out
    assert main(["report", str(data["out"]), "--memory-limit", "1MB"]) == 2
    assert "at least 128MiB" in capsys.readouterr().out
    assert main(["report", str(data["out"]), "--memory-limit", "256MiB"]) == 0


@pytest.mark.parametrize(
    "values",
    [
        0.3 + np.arange(51) * 0.7 / 50,  # every value on a bin edge, up to an ulp
        np.linspace(0.13, 0.91, 51),
        np.repeat([0.25], 7),  # a single value: numpy's range of +-0.5
        np.random.default_rng(3).normal(size=5000).astype(np.float32).astype(np.float64),
    ],
)
def test_histograms_equal_numpys_bin_for_bin(values: np.ndarray) -> None:
    import duckdb

    from fiqa_curator.flows.report_data import _histograms

    connection = duckdb.connect()
    connection.register("t", pa.table({"a": values, "b": values[::-1] * 3, "c": [np.nan] * len(values)}))
    quality, tripled, empty = _histograms(connection, "t", ["a", "b", "c"], 50)
    assert np.array_equal(quality.counts, np.histogram(values, 50)[0])
    assert np.array_equal(quality.edges, np.histogram(values, 50)[1])
    assert np.array_equal(tripled.counts, np.histogram(values[::-1] * 3, 50)[0])
    assert empty is None  # no finite value


def test_report_on_null_and_non_finite_scores(tmp_path: Path) -> None:
    """Ok rows whose exit list is null, or holds a null, NaN or infinite scores: reported, the exits of
    such rows NaN in the agreement's sample (as before), never a crash or a shifted row."""
    from fiqa_curator.flows import report_data
    from fiqa_curator.flows.storage import Output
    from fiqa_curator.schemas.quality_table import exit_score_matrix
    from tests.tables import tied_table

    table = tied_table().sort_by("image_id")
    out = tmp_path / "out"
    (out / "scores").mkdir(parents=True)
    pq.write_table(table, out / "scores" / "shard-00000.parquet")
    data = report_data.collect(Output(str(out)))
    quality = table.column("quality").to_numpy(zero_copy_only=False).astype(np.float64)
    scored = np.array([s == "ok" for s in table.column("status").to_pylist()]) & np.isfinite(quality)
    assert data.scored == int(scored.sum()) and list(data.sample.ids) == list(
        np.array(table.column("image_id").to_pylist())[scored]
    )
    np.testing.assert_array_equal(data.sample.exits, exit_score_matrix(table)[scored])
    assert np.isnan(data.sample.exits).any(axis=1).any()  # the null lists are there, as NaN rows
    assert main(["report", str(out)]) == 0
