"""WebDataset shards enumerated in Ray tasks (flows.tar_listing): the same listing as in-process, nothing
of a shard read on the driver, an unreadable shard named, the rule that picks where to list, and shards
unchanged since OUTPUT's saved plan not read at all."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fiqa_curator.flows import sources
from fiqa_curator.flows.plan import make_plan, save_plan
from fiqa_curator.flows.sources import InputError, TarShard, discover
from fiqa_curator.flows.storage import Output
from fiqa_curator.flows.tar_listing import (
    FINGERPRINT_KEY,
    TASKS_FROM_BYTES,
    SavedListing,
    ShardLister,
    list_tars_in_ray_tasks,
)
from fiqa_curator.schemas.layout import LISTING_FILE, TARS_FILE


def _write_shards(folder: Path, shards: int, per_shard: int) -> None:
    for shard in range(shards):
        path = folder / f"part-{shard:03d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as archive:
            for index in range(per_shard):
                for name, data in [
                    (f"s{index:03d}.jpg", f"image {shard} {index}".encode()),
                    (f"s{index:03d}.cls", f"id{index % 3}".encode()),
                ]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    (folder / "loose.png").write_bytes(b"png")


def _refuse_to_read_tars(monkeypatch) -> None:
    """Enumerating a shard in this (the driver's) process fails the test; Ray's workers import their own,
    untouched copy of the module."""

    def refuse(*args, **kwargs):
        raise AssertionError("a shard was enumerated on the driver")

    monkeypatch.setattr(sources, "_list_tar", refuse)


def test_shards_listed_in_ray_tasks_match_the_in_process_listing(
    tmp_path: Path, ray_cluster, monkeypatch
) -> None:
    _write_shards(tmp_path / "in", shards=7, per_shard=5)
    expected_kind, expected = discover(str(tmp_path / "in"))
    assert expected.num_rows == 7 * 5 + 1

    _refuse_to_read_tars(monkeypatch)
    with pytest.raises(AssertionError, match="on the driver"):  # the guard itself works
        discover(str(tmp_path / "in"))
    kind, listing = discover(str(tmp_path / "in"), list_tars=list_tars_in_ray_tasks)
    assert kind == expected_kind == "folder"
    assert listing.equals(expected)  # same rows, ids, offsets, identities, order
    member = listing.filter(pc.equal(listing.column("image_id"), "part-006.tar/s004")).to_pylist()[0]
    assert member["identity"] == "id1" and member["url"].endswith("part-006.tar")


def test_an_unreadable_shard_is_named_when_listed_in_a_task(tmp_path: Path, ray_cluster) -> None:
    _write_shards(tmp_path / "in", shards=3, per_shard=2)
    (tmp_path / "in" / "part-001.tar").write_bytes(b"\x01" * 700)  # not a tar
    with pytest.raises(InputError, match=r"part-001\.tar"):
        discover(str(tmp_path / "in"), list_tars=list_tars_in_ray_tasks)


def test_the_lister_uses_ray_tasks_for_big_shards_only(tmp_path: Path, ray_cluster, monkeypatch) -> None:
    _write_shards(tmp_path / "in", shards=2, per_shard=2)
    names = [f"part-{i:03d}.tar" for i in range(2)]
    small = [TarShard(f"file://{tmp_path}/in/{name}", name, 10_240) for name in names]
    ensured: list[bool] = []
    lister = ShardLister(lambda: ensured.append(True))

    # small shards: read here, faster than Ray's workers start; Ray left alone
    assert [table.num_rows for table in lister(small, None)] == [2, 2] and ensured == []

    # big (or unsized) shards: in tasks, Ray ensured first; none is enumerated on the driver
    _refuse_to_read_tars(monkeypatch)
    with pytest.raises(AssertionError, match="on the driver"):
        list(lister(small, None))
    big = [TarShard(small[0].url, small[0].tar_id, TASKS_FROM_BYTES), TarShard(small[1].url, small[1].tar_id)]
    assert [table.num_rows for table in lister(big, None)] == [2, 2] and ensured == [True]
    assert [table.num_rows for table in lister(big[1:], None)] == [2] and ensured == [True, True]


def _plan_and_save(folder: Path, output: Output, lister: ShardLister):
    kind, listing = discover(str(folder), list_tars=lister)
    plan = make_plan(str(folder), kind, listing, 4, {"exit_depth": 2})
    save_plan(output, plan)
    lister.save_index(output, plan.listing_fingerprint)
    return plan


def test_shards_unchanged_since_the_saved_plan_are_not_read(tmp_path: Path, monkeypatch) -> None:
    _write_shards(tmp_path / "in", shards=3, per_shard=4)
    output = Output(str(tmp_path / "out"))
    first = _plan_and_save(tmp_path / "in", output, ShardLister(lambda: None))
    assert output.read_bytes(TARS_FILE) is not None

    read: list[str] = []
    list_tar = sources._list_tar
    monkeypatch.setattr(
        sources, "_list_tar", lambda fs, path, tar_id: read.append(tar_id) or list_tar(fs, path, tar_id)
    )

    # a rerun or a resume: nothing read, the same listing
    again = ShardLister(lambda: None, SavedListing.of(output))
    _, listing = discover(str(tmp_path / "in"), list_tars=again)
    assert read == [] and again.reused == 3 and listing.equals(first.listing)

    # one shard rewritten (another size and mtime): only that one is read, and its new member is listed
    with tarfile.open(tmp_path / "in" / "part-001.tar", "a") as archive:
        info = tarfile.TarInfo("s999.jpg")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"new"))
    changed = ShardLister(lambda: None, SavedListing.of(output))
    _, listing = discover(str(tmp_path / "in"), list_tars=changed)
    assert read == ["part-001.tar"] and changed.reused == 2
    assert listing.num_rows == first.listing.num_rows + 1
    assert "part-001.tar/s999" in listing.column("image_id").to_pylist()


def test_a_saved_listing_that_does_not_match_its_plan_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    _write_shards(tmp_path / "in", shards=2, per_shard=3)
    output = Output(str(tmp_path / "out"))
    first = _plan_and_save(tmp_path / "in", output, ShardLister(lambda: None))
    read: list[str] = []
    list_tar = sources._list_tar
    monkeypatch.setattr(
        sources, "_list_tar", lambda fs, path, tar_id: read.append(tar_id) or list_tar(fs, path, tar_id)
    )

    # the listing beside the plan altered (a member's offset): every shard is read again, the listing is right
    saved = pq.read_table(tmp_path / "out" / LISTING_FILE)
    offsets = pc.add(saved.column("offset"), pc.if_else(pc.greater_equal(saved.column("offset"), 0), 512, 0))
    pq.write_table(
        saved.set_column(saved.schema.get_field_index("offset"), "offset", offsets),
        tmp_path / "out" / LISTING_FILE,
    )
    lister = ShardLister(lambda: None, SavedListing.of(output))
    _, listing = discover(str(tmp_path / "in"), list_tars=lister)
    assert sorted(read) == ["part-000.tar", "part-001.tar"] and lister.reused == 0
    assert listing.equals(first.listing)

    # an index written for another plan (a run killed between its plan and its index): not used at all
    index = pq.read_table(tmp_path / "out" / TARS_FILE)
    pq.write_table(index.replace_schema_metadata({FINGERPRINT_KEY: b"0" * 64}), tmp_path / "out" / TARS_FILE)
    assert SavedListing.of(output) is None

    # shards whose store reports no version (nothing tells a rewrite): never reused
    unversioned = index.set_column(3, "version", pa.repeat(pa.scalar(""), index.num_rows))
    pq.write_table(unversioned, tmp_path / "out" / TARS_FILE)
    assert SavedListing.of(output) is None
    pq.write_table(index, tmp_path / "out" / TARS_FILE)  # the index as written: trusted again
    keys = {(row["url"], row["tar_id"], row["size"], row["version"]) for row in index.to_pylist()}
    assert SavedListing.of(output).known == keys
