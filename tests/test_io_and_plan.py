"""Fast tests of the pipeline's building blocks: retries, listing rules, plans, atomic commits."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from fiqa_curator.flows.listing_sort import sort_listing
from fiqa_curator.flows.plan import (
    PLAN_VERSION,
    PlanConflict,
    listing_fingerprint_v1,
    listing_group_rows,
    load_plan,
    make_plan,
    read_listing_rows,
    reconcile,
    save_plan,
    saved_listing_fits,
    shard_items,
    shard_task,
    shard_tasks,
)
from fiqa_curator.flows.sources import (
    ITEM_SCHEMA,
    InputError,
    InputItem,
    TarShard,
    discover,
    items_to_table,
    list_tars_in_process,
    listing_parts,
)
from fiqa_curator.flows.storage import Output
from fiqa_curator.flows.tar_listing import ShardLister
from fiqa_curator.schemas.layout import LISTING_FILE, TARS_FILE, shard_name
from fiqa_curator.workers.io import read_range, with_retries


def _tar_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_transient_errors_are_retried_and_permanent_ones_are_not() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "data"

    assert with_retries(flaky, base_delay=0.001) == "data" and len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, base_delay=0.001)
    assert len(calls) == 1

    def always_down() -> None:
        raise TimeoutError("still down")

    with pytest.raises(TimeoutError):
        with_retries(always_down, attempts=3, base_delay=0.001)


def test_read_range_reads_members_by_offset() -> None:
    with fsspec.open("memory://fiqa-io/blob.bin", "wb") as handle:
        handle.write(b"0123456789")
    assert read_range("memory://fiqa-io/blob.bin") == b"0123456789"
    assert read_range("memory://fiqa-io/blob.bin", 3, 4) == b"3456"


def test_folder_listing_rules(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for name in [
        "z.JPG",
        "a/b/c d é.png",
        "a/x.heic",
        "a/notes.txt",
        ".hidden.png",
        ".git/obj.png",
        "a/.DS.jpg",
    ]:
        (tmp_path / name).write_bytes(b"x")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in [
            ("k1.jpg", b"img"),
            ("k1.cls", b"alice"),
            ("k2.webp", b"img2"),
            ("k2.json", b"{}"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "a" / "shard.tar").write_bytes(buffer.getvalue())
    kind, listing = discover(str(tmp_path))
    items = listing.to_pylist()
    assert kind == "folder"
    assert [item["image_id"] for item in items] == [
        "a/b/c d é.png",
        "a/shard.tar/k1",
        "a/shard.tar/k2",
        "a/x.heic",
        "z.JPG",
    ]
    member = items[1]
    assert member["identity"] == "alice" and member["source"].endswith("shard.tar#k1.jpg")
    assert read_range(member["url"], member["offset"], member["length"]) == b"img"
    with pytest.raises(InputError, match="does not exist"):
        discover(str(tmp_path / "absent"))
    with pytest.raises(InputError, match="must be a folder"):
        discover(str(tmp_path / "a" / "notes.txt"))


def test_manifest_needs_uri_and_unique_ids(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path\nx.jpg\n")
    with pytest.raises(InputError, match="no `uri` column"):
        discover(str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text("uri,image_id\na.jpg,same\nb.jpg,same\n")
    with pytest.raises(InputError, match="more than once"):
        discover(str(tmp_path / "m.csv"))


def _items(count: int) -> list[InputItem]:
    return [InputItem(f"img{i:03d}.jpg", f"s{i}", f"s{i}", size=10 + i) for i in range(count)]


def test_plan_is_deterministic_and_reconciles() -> None:
    config = {"model_sha256": "abc", "exit_depth": 12}
    plan = make_plan("in", "folder", list(reversed(_items(7))), 3, config)
    assert plan.shard_count == 3 and plan.shard_listing(2).column("image_id").to_pylist() == ["img006.jpg"]
    assert plan.listing.column("image_id")[0].as_py() == "img000.jpg" and shard_name(12) == "shard-00012"
    assert [plan.shard_length(i) for i in range(4)] == [3, 3, 1, 0]
    same = make_plan("in", "folder", _items(7), 3, dict(config))
    assert (
        same.listing_fingerprint == plan.listing_fingerprint
        and same.config_fingerprint == plan.config_fingerprint
    )
    assert reconcile(plan, same, overwrite=False, has_results=True) == "resume"
    assert reconcile(None, same, overwrite=False, has_results=False) == "fresh"
    with pytest.raises(PlanConflict, match="no plan"):
        reconcile(None, same, overwrite=False, has_results=True)
    other = make_plan("in", "folder", _items(7), 3, {**config, "exit_depth": 6})
    with pytest.raises(PlanConflict, match=r"configuration changed \(exit_depth\)"):
        reconcile(plan, other, overwrite=False, has_results=True)
    assert reconcile(plan, other, overwrite=True, has_results=True) == "fresh"
    grown = make_plan("in", "folder", _items(8), 3, config)
    with pytest.raises(PlanConflict, match="listing changed"):
        reconcile(plan, grown, overwrite=False, has_results=True)


def test_commit_is_atomic_and_staging_is_cleaned(tmp_path: Path) -> None:
    output = Output(str(tmp_path / "out"))
    output.ensure_writable()
    output.commit_bytes("scores/shard-00000.parquet", b"complete")
    assert (tmp_path / "out" / "scores" / "shard-00000.parquet").read_bytes() == b"complete"
    assert output.list("scores") == ["shard-00000.parquet"] and output.list("absent") == []
    (tmp_path / "out" / "_staging" / "shard-00001.parquet.dead.part").write_bytes(b"half")
    output.clean_staging()
    assert output.list("_staging") == []
    assert output.read_bytes("nothing") is None


def test_tar_members_with_dot_slash_and_odd_names(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:  # what `tar -cf s.tar -C dir .` writes
        for name, data in [
            ("./a.jpg", b"A"),
            ("./sub/b.png", b"B"),
            ("./.hidden.jpg", b"H"),
            ("./c::d.jpg", b"C"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buffer.getvalue())
    kind, listing = discover(str(tmp_path / "s.tar"))
    items = listing.to_pylist()
    assert kind == "webdataset" and [i["image_id"] for i in items] == ["s.tar/a", "s.tar/c::d", "s.tar/sub/b"]
    assert [read_range(i["url"], i["offset"], i["length"]) for i in items] == [b"A", b"C", b"B"]


def test_manifest_uris_are_normalised_and_ids_kept(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x::y.jpg").write_bytes(b"XY")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.csv").write_text("uri,image_id\n../data/x::y.jpg,0\n./../data/x::y.jpg,1\n")
    _, listing = discover(str(tmp_path / "lists" / "m.csv"))
    items = listing.to_pylist()
    assert [i["image_id"] for i in items] == ["0", "1"]
    assert all("/./" not in i["url"] and "/../" not in i["url"] for i in items)
    assert read_range(items[0]["url"]) == b"XY"  # "::" is part of the name, not a filesystem chain


def test_output_urls_with_glob_characters_are_refused() -> None:
    from fiqa_curator.flows.storage import OutputError

    with pytest.raises(OutputError, match="must not contain"):
        Output("memory://runs/o[1]")


def test_checking_output_ahead_of_the_work_leaves_no_folder_it_created(tmp_path: Path) -> None:
    from fiqa_curator.flows.storage import OutputError

    Output(str(tmp_path / "a" / "b" / "out")).check_writable()
    assert list(tmp_path.iterdir()) == []  # a, a/b, out and out/_staging: created to prove it, removed
    (tmp_path / "out" / "kept").mkdir(parents=True)
    Output(str(tmp_path / "out")).check_writable()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept"]
    with pytest.raises(OutputError, match="OUTPUT is not writable"):
        Output("/proc/fiqa-cannot-write-here").check_writable()


def test_storage_options_only_reach_their_own_store(tmp_path: Path) -> None:
    """A manifest may name https:// images next to s3:// ones: S3 credentials must not go to the web server
    (and would break the request). A real HTTP server on loopback serves the image."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import numpy as np
    from PIL import Image

    from fiqa_curator.workers.reading import read_and_decode

    Image.new("RGB", (112, 112), (10, 20, 30)).save(tmp_path / "a.png")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
        batch = {
            "image_id": np.array(["a.png"], dtype=object),
            "url": np.array([url], dtype=object),
            "offset": np.array([-1]),
            "length": np.array([-1]),
        }
        s3_credentials = {"key": "AKIA-for-s3-only", "secret": "s"}
        out = read_and_decode(batch, storage_options=s3_credentials, options_protocol="s3")
        assert list(out["status"]) == ["ok"] and tuple(out["pixels"][0, 0, 0]) == (10, 20, 30)
        # the same options handed to the HTTP filesystem break the read: what the protocol check prevents
        wrong = read_and_decode(batch, storage_options=s3_credentials, options_protocol="http")
        assert list(wrong["status"]) == ["read_error"]
    finally:
        server.shutdown()


def test_watched_batches_fail_on_a_stall_and_pass_everything_else() -> None:
    import threading

    from fiqa_curator.flows.execution import StallError, watched

    # timeouts far above what an unstalled item needs, so a pause of a busy machine is not a stall
    assert list(watched(iter(range(5)), 10.0)) == [0, 1, 2, 3, 4]
    assert list(watched(iter(range(3)), None)) == [0, 1, 2]

    released = threading.Event()

    def stalls():
        yield 1
        released.wait()  # stalled until the test is over: no sleep to race against
        yield 2

    seen = []
    try:
        with pytest.raises(StallError, match=r"no scored batch for 2 s"):
            for item in watched(stalls(), 2.0):
                seen.append(item)
    finally:
        released.set()
    assert seen == [1]

    def breaks():
        yield 1
        raise OSError("lost")

    with pytest.raises(OSError, match="lost"):
        list(watched(breaks(), 5.0))


def test_tar_members_of_a_batch_are_read_in_spans(tmp_path: Path, monkeypatch) -> None:
    """One request per run of neighbouring members, not one per 4 KB face: the rows are the same as
    member-by-member reads, and a failed span fails only its own members."""
    import tarfile

    import numpy as np
    from PIL import Image

    import fiqa_curator.workers.reading
    from fiqa_curator.workers.preprocess import decode_face
    from fiqa_curator.workers.reading import read_and_decode

    members: dict[str, bytes] = {}
    for index in range(10):
        buffer = io.BytesIO()
        Image.new("RGB", (112, 112), (index * 20, 5, 9)).save(buffer, format="PNG")
        members[f"{index:02d}.png"] = buffer.getvalue()
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "shard.tar") as tar:
        ranges = {info.name: (info.offset_data, info.size) for info in tar.getmembers()}
    (tmp_path / "alone.png").write_bytes(members["00.png"])
    order = [
        "07.png",
        "01.png",
        "09.png",
        "00.png",
        "04.png",
        "02.png",
        "08.png",
        "03.png",
        "06.png",
        "05.png",
    ]
    items = [(name, str(tmp_path / "shard.tar"), *ranges[name]) for name in order]
    items += [
        ("alone", str(tmp_path / "alone.png"), -1, -1),
        ("lost", str(tmp_path / "missing.tar"), 512, 100),
    ]
    batch = {
        "image_id": np.array([i[0] for i in items], dtype=object),
        "url": np.array([i[1] for i in items], dtype=object),
        "offset": np.array([i[2] for i in items]),
        "length": np.array([i[3] for i in items]),
    }

    calls: list[tuple] = []
    real = fiqa_curator.workers.reading.read_range
    monkeypatch.setattr(
        fiqa_curator.workers.reading, "read_range", lambda *a, **k: calls.append(a) or real(*a, **k)
    )

    def rows() -> dict[str, tuple]:
        out = read_and_decode(dict(batch))
        return {
            name: (status, size, pixels.tobytes())
            for name, status, size, pixels in zip(
                out["image_id"], out["status"], out["byte_size"], out["pixels"], strict=True
            )
        }

    spanned = rows()
    assert len(calls) == 3  # the whole tar in one read, the lone file, the missing tar
    for name, data in members.items():
        assert spanned[name] == ("ok", len(data), decode_face(data).image.tobytes())
    assert spanned["alone"][0] == "ok" and spanned["lost"][0] == "read_error"

    calls.clear()
    monkeypatch.setattr(
        fiqa_curator.workers.reading, "MAX_GAP", 0
    )  # tar headers (512 bytes) now separate every member
    assert rows() == spanned and len(calls) == 12
    calls.clear()
    monkeypatch.setattr(fiqa_curator.workers.reading, "MAX_GAP", 1 << 20)
    step = ranges["01.png"][0] - ranges["00.png"][0]  # header + member + padding
    assert all(size < step for _, size in ranges.values())
    monkeypatch.setattr(
        fiqa_curator.workers.reading, "MAX_SPAN", step + max(size for _, size in ranges.values())
    )
    assert rows() == spanned and len(calls) == 5 + 2  # two members per span


def test_manifest_columns_are_read_as_arrow_with_the_row_by_row_rules(tmp_path: Path) -> None:
    """CSV cells stay strings ("007" is an id, not 7); empty identity is null, empty size is -1, empty
    version is ""; an empty image_id falls back to the URI; a bad size or an empty uri names its row."""
    (tmp_path / "m.csv").write_text(
        "uri,image_id,identity,size,version\n"
        " /data/a.jpg ,007,alice, 12 ,v1\n"
        '"/data/b,c.jpg",,,,\n'
        "/data/d.jpg,  ,bob,3,\n"
    )
    _, listing = discover(str(tmp_path / "m.csv"))
    assert listing.schema == ITEM_SCHEMA
    rows = {row["image_id"]: row for row in listing.to_pylist()}
    assert sorted(rows) == ["/data/b,c.jpg", "/data/d.jpg", "007"]
    assert rows["007"] == {
        "image_id": "007",
        "source": "/data/a.jpg",
        "url": "/data/a.jpg",
        "offset": -1,
        "length": -1,
        "identity": "alice",
        "size": 12,
        "version": "v1",
    }
    assert (rows["/data/b,c.jpg"]["identity"], rows["/data/b,c.jpg"]["size"]) == (None, -1)
    assert rows["/data/b,c.jpg"]["version"] == "" and rows["/data/d.jpg"]["identity"] == "bob"
    pq.write_table(
        pa.table({"uri": ["x/a.jpg", "/abs/b.jpg"], "identity": [None, "carol"], "size": [5, None]}),
        tmp_path / "m.parquet",
    )
    _, listing = discover(str(tmp_path / "m.parquet"))
    rows = {row["image_id"]: row for row in listing.to_pylist()}
    assert rows["x/a.jpg"]["url"] == f"file://{tmp_path}/x/a.jpg"  # relative to the manifest's folder
    assert (rows["x/a.jpg"]["identity"], rows["x/a.jpg"]["size"]) == (None, 5)
    assert (rows["/abs/b.jpg"]["identity"], rows["/abs/b.jpg"]["size"]) == ("carol", -1)
    (tmp_path / "bad.csv").write_text("uri,size\na.jpg,1\nb.jpg,big\n")
    with pytest.raises(InputError, match=r"row 2: `size` is not an integer: 'big'"):
        discover(str(tmp_path / "bad.csv"))
    (tmp_path / "blank.csv").write_text("uri\na.jpg\n  \n")
    with pytest.raises(InputError, match=r"row 2: empty `uri`"):
        discover(str(tmp_path / "blank.csv"))


def _v1_fingerprint(items: list[InputItem]) -> str:
    """Plan version 1's listing fingerprint, as that release computed it (item objects, a JSON line each)."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda item: item.image_id):
        fields = [
            item.image_id,
            item.source,
            item.offset,
            item.length,
            item.size,
            item.version,
            item.identity,
        ]
        digest.update(json.dumps(fields).encode() + b"\n")
    return digest.hexdigest()


def test_listing_fingerprint_sees_every_field_but_not_chunks_or_order() -> None:
    items = [
        InputItem(
            f"img{i:03d}", f"s{i}", f"u{i}", offset=i, length=2 * i, identity=None if i % 2 else f"id{i}"
        )
        for i in range(200)
    ]
    config = {"exit_depth": 12}
    plan = make_plan("in", "folder", items, 7, config)
    table = items_to_table(list(reversed(items)))
    rechunked = pa.concat_tables([table.slice(0, 13), table.slice(13, 100), table.slice(113)])
    assert make_plan("in", "folder", rechunked, 7, config).listing_fingerprint == plan.listing_fingerprint
    changed = [
        replace(items[5], version="v2"),
        replace(items[5], identity=""),  # "" is not null
        replace(items[5], offset=6),
        replace(items[5], source="s5 "),
        replace(items[5], size=0),
    ]
    fingerprints = {
        make_plan("in", "folder", [*items[:5], other, *items[6:]], 7, config).listing_fingerprint
        for other in changed
    }
    assert len(fingerprints) == len(changed) and plan.listing_fingerprint not in fingerprints
    # an output planned by version 1 (before the Arrow listing) resumes; a changed listing still conflicts
    old = replace(plan, version=1, listing=None, listing_fingerprint=_v1_fingerprint(items))
    assert listing_fingerprint_v1(plan.listing) == old.listing_fingerprint
    assert reconcile(old, plan, overwrite=False, has_results=True) == "resume"
    grown = make_plan("in", "folder", [*items, InputItem("img999", "s", "u")], 7, config)
    with pytest.raises(PlanConflict, match="listing changed"):
        reconcile(old, grown, overwrite=False, has_results=True)


def test_shard_listing_follows_the_shards(tmp_path: Path) -> None:
    plan = make_plan("in", "folder", [InputItem(f"i{n:02d}", "s", "u") for n in range(10)], 4, {})
    assert plan.shard_listing(2).column("image_id").to_pylist() == ["i08", "i09"]
    assert plan.shard_listing(0).column("image_id").to_pylist() == ["i00", "i01", "i02", "i03"]
    assert [plan.shard_length(i) for i in range(4)] == [4, 4, 2, 0]
    save_plan(Output(str(tmp_path / "out")), plan)
    saved = pq.read_table(tmp_path / "out" / LISTING_FILE)
    assert saved.equals(plan.listing) and load_plan(Output(str(tmp_path / "out"))).version == PLAN_VERSION


def test_scoring_tasks_read_their_shards_items_from_the_saved_listing(tmp_path: Path, monkeypatch) -> None:
    """The driver hands Ray a description per shard; each task reads its items from OUTPUT's listing."""
    import fiqa_curator.flows.plan as plan_module
    from fiqa_curator.flows.shard_reading import read_shards

    monkeypatch.setattr(plan_module, "LISTING_GROUP_MIN_ROWS", 1000)
    items = [InputItem(f"i{n:04d}", "s", str(tmp_path / f"absent{n}.jpg"), size=n) for n in range(2500)]
    plan = make_plan("in", "folder", items, 300, {})
    output = Output(str(tmp_path / "out"))
    save_plan(output, plan)
    listing_url = output.full_url(LISTING_FILE)
    # row groups hold whole shards, at least LISTING_GROUP_MIN_ROWS rows: 4 shards of 300 per group
    groups = pq.ParquetFile(tmp_path / "out" / LISTING_FILE).metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [1200, 1200, 100]
    assert [listing_group_rows(size) for size in (1, 300, 1000, 5000)] == [1000, 1200, 1000, 5000]
    assert saved_listing_fits(output, load_plan(output))

    tasks = shard_tasks(plan, [8, 3])  # the last shard (100 items) and one inside the second group
    assert tasks == [
        {"shard": "shard-00008", "start": 2400, "stop": 2500, "only": ""},
        {"shard": "shard-00003", "start": 900, "stop": 1200, "only": ""},
    ]
    expected = pa.concat_tables(
        plan.shard_listing(i).append_column("shard", pa.repeat(shard_name(i), plan.shard_length(i)))
        for i in (8, 3)
    ).drop_columns(["size", "version"])
    read = pa.concat_tables([shard_items(task, listing_url, key=plan.listing_fingerprint) for task in tasks])
    assert read.equals(expected)
    assert (listing_url, plan.listing_fingerprint) in plan_module._FOOTERS  # read once per process
    in_memory = pa.py_buffer((tmp_path / "out" / LISTING_FILE).read_bytes())  # a multi-node local OUTPUT
    assert pa.concat_tables([shard_items(task, in_memory) for task in tasks]).equals(expected)

    # the reading stage: one shard per task, its rows decoded a block at a time (here: unreadable files,
    # each a row with its status and reason)
    blocks = list(
        read_shards(
            pa.Table.from_pylist(tasks[1:]),
            listing=listing_url,
            key="",
            storage_options=None,
            block_rows=64,
            read_options={"img_size": 112},
        )
    )
    assert [len(block["item_id"]) for block in blocks] == [64, 64, 64, 64, 44]
    assert [i for block in blocks for i in block["item_id"]] == [f"i{n:04d}" for n in range(900, 1200)]
    assert {s for block in blocks for s in block["status"]} == {"read_error"}

    # --since: a shard partly carried over names the ids left to score (execution.carry_over)
    task = shard_task(plan, 3, pa.array([f"i{n:04d}" for n in range(900, 1200) if n % 7 == 0]))
    assert (task["shard"], task["start"], task["stop"]) == ("shard-00003", 900, 1200)
    read = shard_items(task, listing_url)
    assert read.column("image_id").to_pylist() == [f"i{n:04d}" for n in range(900, 1200) if n % 7 == 0]
    assert set(read.column("shard").to_pylist()) == {"shard-00003"}

    # any row-group layout reads the same rows; one saved by older code is committed again on resume
    pq.write_table(plan.listing, tmp_path / "out" / LISTING_FILE, row_group_size=7)
    for start, stop in ((0, 300), (899, 1200), (2400, 2500)):
        got = read_listing_rows(listing_url, start, stop)
        assert got.equals(plan.listing.slice(start, stop - start))
    assert not saved_listing_fits(output, load_plan(output))
    assert not saved_listing_fits(output, replace(load_plan(output), version=1))
    # a listing that is not the plan's (shorter) fails the task instead of scoring part of a shard
    pq.write_table(plan.listing.slice(0, 2450), tmp_path / "short.parquet")
    with pytest.raises(RuntimeError, match="holds 2450 rows"):
        read_listing_rows(str(tmp_path / "short.parquet"), 2400, 2500)


def test_a_listing_sorted_on_disk_plans_exactly_as_in_memory(tmp_path: Path, monkeypatch) -> None:
    """A run spills its listing and DuckDB sorts it: the same order (UTF-8 bytes, as Arrow's), the same
    fingerprint (so an OUTPUT planned in memory resumes), a saved listing in shard-aligned row groups."""
    import random

    import fiqa_curator.flows.plan as plan_module

    monkeypatch.setattr(plan_module, "FINGERPRINT_ROWS", 777)  # many slices, not aligned with the groups
    monkeypatch.setattr(plan_module, "LISTING_GROUP_MIN_ROWS", 1000)
    rng = random.Random(7)
    alphabet = ["a", "B", "é", "e\u0301", "ß", "中", "😀", "/", "-", "_", "0", "Z", " "]
    ids = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(5000)})
    rng.shuffle(ids)
    items = [InputItem(i, "s", f"u{n}", identity=None if n % 3 else "x", size=n) for n, i in enumerate(ids)]
    table = items_to_table(items)
    listing = sort_listing([table.slice(start, 1000) for start in range(0, len(ids), 1000)], str(tmp_path))
    assert listing.rows == len(ids) > 3000
    on_disk = make_plan("in", "manifest", listing, 300, {"a": 1})
    in_memory = make_plan("in", "manifest", table, 300, {"a": 1})
    assert on_disk.listing is None and on_disk.listing_fingerprint == in_memory.listing_fingerprint
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sorted.plan.parquet"]  # the rest removed
    saved = pq.ParquetFile(on_disk.listing_file)
    assert saved.read().equals(in_memory.listing)
    groups = [saved.metadata.row_group(i).num_rows for i in range(saved.metadata.num_row_groups)]
    assert set(groups[:-1]) == {1200} and sum(groups) == len(ids)
    assert on_disk.load_listing().equals(in_memory.listing)

    output = Output(str(tmp_path / "out"))
    save_plan(output, make_plan("in", "manifest", sort_listing([table], str(tmp_path)), 300, {"a": 1}))
    assert pq.read_table(tmp_path / "out" / LISTING_FILE).equals(in_memory.listing)
    assert reconcile(load_plan(output), in_memory, overwrite=False, has_results=True) == "resume"
    assert "listing_file" not in json.loads((tmp_path / "out" / "_plan.json").read_text())


def test_repeated_ids_and_empty_listings_on_disk(tmp_path: Path, monkeypatch) -> None:
    import fiqa_curator.flows.plan as plan_module

    monkeypatch.setattr(plan_module, "FINGERPRINT_ROWS", 4)
    ids = [f"i{n:02d}" for n in range(20)] + ["i03", "i07", "i08", "i03"]  # i07 | i08 across a slice edge
    parts = [
        items_to_table([InputItem(i, "s", "u") for i in ids[start : start + 5]])
        for start in (0, 5, 10, 15, 20)
    ]
    listing = sort_listing(parts, str(tmp_path))
    with pytest.raises(
        InputError, match=r"3 image_id values occur more than once, e.g. \['i03', 'i07', 'i08'\]"
    ):
        make_plan("in", "folder", listing, 5, {})
    # an id repeated at the end of one slice and at the start of the next is one id, counted once
    edge = sort_listing(
        [items_to_table([InputItem(i, "s", "u") for i in ["a", "b", "c", "c", "c"]])], str(tmp_path)
    )
    with pytest.raises(InputError, match=r"^1 image_id values occur more than once, e.g. \['c'\]$"):
        make_plan("in", "folder", edge, 5, {})
    empty = sort_listing(iter([items_to_table([])]), str(tmp_path / "."))
    assert empty.rows == 0 and pq.read_table(empty.path).schema.equals(ITEM_SCHEMA)


def test_manifests_are_read_a_batch_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """Row numbers in errors count from the manifest's start whichever batch they are in."""
    import fiqa_curator.flows.sources as sources_module

    monkeypatch.setattr(sources_module, "MANIFEST_BATCH_ROWS", 3)
    monkeypatch.setattr(sources_module, "MANIFEST_CSV_BLOCK_BYTES", 40)
    rows = "".join(f"img{n}.jpg,{n}\n" for n in range(10))
    (tmp_path / "m.csv").write_text("uri,size\n" + rows)
    kind, parts = listing_parts(str(tmp_path / "m.csv"))
    parts = list(parts)
    assert kind == "manifest" and len(parts) > 1 and sum(part.num_rows for part in parts) == 10
    _, listing = discover(str(tmp_path / "m.csv"))
    assert listing.column("size").to_pylist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    pq.write_table(
        pa.table({"uri": [f"p{n}.jpg" for n in range(10)]}), tmp_path / "m.parquet", row_group_size=4
    )
    assert discover(str(tmp_path / "m.parquet"))[1].num_rows == 10
    (tmp_path / "late.csv").write_text("uri,size\n" + rows + "x.jpg,big\n")
    with pytest.raises(InputError, match=r"row 11: `size` is not an integer: 'big'"):
        discover(str(tmp_path / "late.csv"))
    (tmp_path / "blank.csv").write_text("uri\n" + "a.jpg\n" * 7 + "  \n")
    with pytest.raises(InputError, match=r"row 8: empty `uri`"):
        list(listing_parts(str(tmp_path / "blank.csv"))[1])


def test_folders_are_listed_a_batch_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """A folder's images come in tables of FOLDER_BATCH_ROWS, its shards' members after them; hidden
    folders are not visited (what they hold would be left out anyway)."""
    import fiqa_curator.flows.sources as sources_module

    monkeypatch.setattr(sources_module, "FOLDER_BATCH_ROWS", 3)
    for name in ["a/1.jpg", "a/2.jpg", "b/c/3.png", "4.jpg", "5.webp", "6.txt", ".cache/7.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * len(name))
    (tmp_path / "b" / "s.tar").write_bytes(_tar_of({"k.jpg": b"img"}))
    listed: list[str] = []
    original_ls = LocalFileSystem.ls

    def counted_ls(self, path, *args, **kwargs):
        listed.append(Path(path).name)
        return original_ls(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", counted_ls)
    kind, parts = listing_parts(str(tmp_path))
    sizes = [part.num_rows for part in parts]
    assert kind == "folder" and sizes == [3, 2, 1]  # 5 images in tables of 3, then the shard's member
    assert ".cache" not in listed and {"a", "b", "c"} <= set(listed)
    _, listing = discover(str(tmp_path))
    assert listing.column("image_id").to_pylist() == [
        "4.jpg",
        "5.webp",
        "a/1.jpg",
        "a/2.jpg",
        "b/c/3.png",
        "b/s.tar/k",
    ]
    assert listing.column("size").to_pylist()[:2] == [5, 6]


def test_shards_are_listed_by_name_whatever_order_the_store_gives(tmp_path: Path, monkeypatch) -> None:
    """A store lists a directory in no particular order (CI's disk gave train-0001 before train-0000): the
    shards still go to the tar lister, and so into OUTPUT's index of shards, sorted by name."""
    for shard in ["train-0000.tar", "train-0001.tar", "sub/train-0002.tar"]:
        (tmp_path / shard).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / shard).write_bytes(_tar_of({"k.jpg": b"img"}))
    original_ls = LocalFileSystem.ls

    def reversed_ls(self, path, *args, **kwargs):
        return sorted(original_ls(self, path, *args, **kwargs), key=lambda info: info["name"], reverse=True)

    monkeypatch.setattr(LocalFileSystem, "ls", reversed_ls)
    given: list[str] = []

    def list_tars(tars, storage_options):
        given.extend(shard.tar_id for shard in tars)
        return list_tars_in_process(tars, storage_options)

    _, parts = listing_parts(str(tmp_path), list_tars=list_tars)
    assert sum(part.num_rows for part in parts) == 3
    assert given == ["sub/train-0002.tar", "train-0000.tar", "train-0001.tar"]

    lister = ShardLister(ensure_ray=lambda: None)
    for name in reversed(given):  # a lister given its shards in any order (as Ray tasks finish)
        list(lister([TarShard(str(tmp_path / name), name, (tmp_path / name).stat().st_size, "v")], None))
    output = Output(str(tmp_path / "out"))
    lister.save_index(output, "fingerprint")
    saved = pq.read_table(tmp_path / "out" / TARS_FILE).column("tar_id").to_pylist()
    assert saved == ["sub/train-0002.tar", "train-0000.tar", "train-0001.tar"]


def test_s3_folders_are_listed_page_by_page_with_retries(s3_server, s3_bucket: str, monkeypatch) -> None:
    """On S3 a folder is listed a page at a time (pages of 2 keys here); a page that fails once is asked for
    again from its continuation token: the listing is whole, each object once, with its ETag as version."""
    import s3fs

    import fiqa_curator.flows.sources as sources_module

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    names = ["in/a/1.jpg", "in/a/2.jpg", "in/b/3.png", "in/4.jpg", "in/5.jpg", "in/notes.txt", "in/.x/6.jpg"]
    for name in names:
        fs.pipe(f"{s3_bucket}/{name}", name.encode())
    fs.pipe(f"{s3_bucket}/in/b/s.tar", _tar_of({"k.jpg": b"img"}))
    fs.pipe(f"{s3_bucket}/other/7.jpg", b"not under INPUT")
    monkeypatch.setattr(sources_module, "S3_PAGE_KEYS", 2)
    monkeypatch.setattr(sources_module, "FOLDER_BATCH_ROWS", 2)
    calls: list[dict] = []
    call_s3 = s3fs.S3FileSystem._call_s3

    async def flaky_call_s3(self, method, *args, **kwargs):
        if method == "list_objects_v2" and "Delimiter" not in kwargs:
            calls.append(kwargs)
            if len(calls) == 2:
                raise ConnectionError("connection reset by peer")
        return await call_s3(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", flaky_call_s3)
    monkeypatch.setattr(sources_module, "with_retries", lambda action: with_retries(action, base_delay=0.001))
    kind, parts = listing_parts(f"s3://{s3_bucket}/in", s3_server.storage_options)
    parts = list(parts)
    assert kind == "folder" and [part.num_rows for part in parts] == [2, 2, 1, 1]
    pages = [call for call in calls if "Delimiter" not in call]  # not `isdir`'s own listing
    assert len(pages) == 5 and pages[1] == pages[2]  # 8 keys in pages of 2; the failed page asked again
    assert all(call["MaxKeys"] == 2 and call["Prefix"] == "in/" for call in pages)
    listing = pa.concat_tables(parts).sort_by("image_id")
    assert listing.column("image_id").to_pylist() == [
        "4.jpg",
        "5.jpg",
        "a/1.jpg",
        "a/2.jpg",
        "b/3.png",
        "b/s.tar/k",
    ]
    found = fs.find(f"{s3_bucket}/in", detail=True)
    assert listing.column("url").to_pylist()[0] == f"s3://{s3_bucket}/in/4.jpg"
    assert listing.column("version").to_pylist()[0] == found[f"{s3_bucket}/in/4.jpg"]["ETag"].strip('"')
    assert listing.column("size").to_pylist()[:3] == [len("in/4.jpg"), len("in/5.jpg"), len("in/a/1.jpg")]


def test_planning_folders_of_killed_runs_are_removed(tmp_path: Path) -> None:
    """A run killed with `kill -9` leaves its planning folder: the next run on this host removes it, and
    leaves those of live processes and of other hosts alone."""
    import os
    import socket
    import subprocess
    import sys

    from fiqa_curator.flows.listing_sort import planning_folder

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    dead = tmp_path / f"fiqa-plan-{host}-{int(gone.stdout)}-abc"
    alive = tmp_path / f"fiqa-plan-{host}-{os.getpid()}-def"
    elsewhere = tmp_path / f"fiqa-plan-{host}x-{int(gone.stdout)}-ghi"
    for folder in (dead, alive, elsewhere):
        (folder / "sort").mkdir(parents=True)
        (folder / "sort" / "unsorted.parquet").write_bytes(b"x" * 100)
    with planning_folder(str(tmp_path)) as folder:
        assert Path(folder).name.startswith(f"fiqa-plan-{host}-{os.getpid()}-")
        assert not dead.exists() and alive.exists() and elsewhere.exists()
    assert not Path(folder).exists()
