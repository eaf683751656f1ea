"""`fiqa report`: the page is parsed back and every section checked against numbers computed here."""

from __future__ import annotations

import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fiqa_curator.flows.cli import main
from fiqa_curator.schemas import build_quality_table

XSS_NAME = "<script>alert(1)</script>.jpg"


class Page(HTMLParser):
    """Sections, tables (by id: rows of cell texts), image sources and any script tags of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.scripts = 0
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

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


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
    thumbnails = [src for src in page.images if len(src) < 60_000]
    assert len(thumbnails) >= 3 * 8  # three galleries of eight previews
    decoded = Image.open(io.BytesIO(__import__("base64").b64decode(thumbnails[-1].split(",", 1)[1])))
    assert decoded.size == (112, 112)


@pytest.mark.browser
def test_report_in_a_real_headless_browser(tmp_path: Path) -> None:
    from tests.browser import load_page

    data = make_output(tmp_path)
    assert main(["report", str(data["out"])]) == 0
    page = (data["out"] / "report" / "index.html").resolve()
    load = load_page(page.as_uri())
    assert load.console_errors == []
    assert load.dialogs == []  # the <script>alert(1)</script> file name never ran
    assert [u for u in load.requests if not u.startswith(("file:", "data:"))] == []  # no external requests
    assert load.requests and load.requests[0] == page.as_uri()
    assert load.screenshot.startswith(b"\x89PNG")
    (tmp_path / "report.png").write_bytes(load.screenshot)
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.width >= 1000 and shot.height > 1000
