"""WebDataset shards enumerated in Ray tasks (flows.tar_listing): the same listing as in-process, nothing
of a shard read on the driver, an unreadable shard named, and the rule that picks where to list."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow.compute as pc
import pytest

from fiqa_curator.flows import sources
from fiqa_curator.flows.sources import InputError, TarShard, discover
from fiqa_curator.flows.tar_listing import TASKS_FROM_BYTES, list_tars_in_ray_tasks, tar_lister


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


def test_the_lister_uses_ray_when_it_runs_or_the_shards_are_big(
    tmp_path: Path, ray_cluster, monkeypatch
) -> None:
    _write_shards(tmp_path / "in", shards=2, per_shard=2)
    names = [f"part-{i:03d}.tar" for i in range(2)]
    small = [TarShard(f"file://{tmp_path}/in/{name}", name, 10_240) for name in names]
    ensured: list[bool] = []
    lister = tar_lister(lambda: ensured.append(True))

    # Ray not running (as the CLI sees it before scoring starts) and small shards: listed here, Ray left alone
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    here = [table.num_rows for table in lister(small, None)]
    assert here == [2, 2] and ensured == []
    monkeypatch.undo()

    # the same shards once Ray runs, and big (or unsized) shards in any case: in tasks, Ray ensured first
    _refuse_to_read_tars(monkeypatch)
    assert [table.num_rows for table in lister(small, None)] == [2, 2] and ensured == [True]
    big = [TarShard(small[0].url, small[0].tar_id, TASKS_FROM_BYTES), TarShard(small[1].url, small[1].tar_id)]
    assert [table.num_rows for table in lister(big, None)] == [2, 2] and ensured == [True, True]
