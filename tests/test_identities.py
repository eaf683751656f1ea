"""`fiqa identities` and the identity rules of `fiqa select`: the arithmetic against brute force, the
command on planted problems (local and on the S3 server), and a small version of the validation on real
faces with dlib's embeddings (benchmarks/validate_identities.py runs the whole one)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fiqa_curator.evaluation import identities as core
from fiqa_curator.flows.cli import main
from fiqa_curator.flows.curation import select
from fiqa_curator.flows.identities import find_identities
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.identities import IDENTITIES_SCHEMA, IDENTITY_IMAGES_SCHEMA
from tests.tables import synthetic_table


# ---- the arithmetic, against plain loops ------------------------------------------------------------------
def _groups(rng: np.random.Generator, sizes: list[int], dimension: int = 8):
    units, _ = core.unit_rows(rng.normal(size=(sum(sizes), dimension)))
    starts = np.cumsum([0, *sizes[:-1]])
    return units, starts


@pytest.mark.parametrize("tiny", [False, True])  # tiny: others weigh 1e-5 of the row (float cancellation)
def test_leave_one_out_similarity_equals_a_loop(tiny: bool) -> None:
    rng = np.random.default_rng(1)
    sizes = [1, 2, 3, 7, 1, 20]
    units, starts = _groups(rng, sizes, dimension=512 if tiny else 8)
    weights = rng.random(len(units))
    if tiny:
        weights = np.where(rng.random(len(units)) < 0.5, 1.0, 1e-5)
    members = rng.random(len(units)) > 0.2
    weights[~members] = 0.0
    found = core.similarity_to_centre(units, weights, starts, members)
    for g, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        for row in range(start, start + size):
            others = [k for k in range(start, start + size) if k != row and members[k]]
            if not others:
                assert np.isnan(found[row]), (g, row)
                continue
            centre = sum(weights[k] * units[k].astype(np.float64) for k in others)
            expected = units[row].astype(np.float64) @ centre / np.linalg.norm(centre)
            assert found[row] == pytest.approx(expected, abs=1e-6), (g, row)


def test_judge_flags_the_stranger_and_refits_without_it() -> None:
    rng = np.random.default_rng(2)
    person = rng.normal(size=16)
    faces = person + 0.3 * rng.normal(size=(9, 16))
    stranger = rng.normal(size=(1, 16))
    pair = rng.normal(size=(2, 16))  # two images that disagree: nothing to tell them apart
    units, valid = core.unit_rows(np.vstack([faces, stranger, pair]))
    starts = np.array([0, 10])
    weights = np.ones(len(units))
    judged = core.judge(units, valid, weights, starts, threshold=0.8)
    assert judged.outlier.tolist() == [False] * 9 + [True, True, True]
    clean_centre = faces.mean(0) / np.linalg.norm(faces.mean(0))
    without_stranger = sum(units[:9]) / np.linalg.norm(sum(units[:9]))
    assert judged.centres[0] @ without_stranger == pytest.approx(1.0, abs=1e-6)  # the refit left it out
    assert judged.centres[0] @ clean_centre > 0.99


def _greedy_loop(units, quality, starts, eligible, threshold):
    duplicate_of = np.full(len(units), -1)
    bounds = [*starts.tolist(), len(units)]
    for start, end in itertools.pairwise(bounds):
        rows = [k for k in range(start, end) if eligible[k]]
        rows.sort(key=lambda k: (-quality[k], k))
        kept: list[int] = []
        for k in rows:
            match = [j for j in kept if units[k] @ units[j] >= threshold]
            if match:
                duplicate_of[k] = match[0]
            else:
                kept.append(k)
    return duplicate_of


@pytest.mark.parametrize(
    "max_cells, large",  # one product per size; one identity at a time; large ones in blocks of 4
    [(1 << 24, 4096), (64, 4096), (1 << 24, 3)],
)
def test_near_duplicates_equal_the_greedy_loop(max_cells: int, large: int, monkeypatch) -> None:
    monkeypatch.setattr(core, "LARGE_IDENTITY", large)
    monkeypatch.setattr(core, "BLOCK", 4)
    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 4, 5, 9, 17, 2, 33]
    base = rng.normal(size=(sum(sizes), 6))
    copies = rng.random(len(base)) < 0.4  # many rows are near-copies of the previous row
    for k in np.flatnonzero(copies)[1:]:
        base[k] = base[k - 1] + 0.05 * rng.normal(size=6)
    units, _ = core.unit_rows(base)
    starts = np.cumsum([0, *sizes[:-1]])
    quality = rng.integers(0, 4, size=len(units)).astype(float)  # ties: broken by row order
    eligible = rng.random(len(units)) > 0.1
    found = core.near_duplicates(units, quality, starts, eligible, 0.95, max_cells=max_cells)
    expected = _greedy_loop(units, quality, starts, eligible, 0.95)
    assert (found >= 0).sum() > 10
    np.testing.assert_array_equal(found, expected)


def test_nearest_identities_exact_and_inverted_file(monkeypatch) -> None:
    rng = np.random.default_rng(4)
    count = 3000
    centres, _ = core.unit_rows(rng.normal(size=(count, 32)))
    twins, _ = core.unit_rows(centres + 0.02 * rng.normal(size=centres.shape))
    data = np.vstack([centres, twins])  # every centre's nearest other is its twin
    twin = np.r_[np.arange(count, 2 * count), np.arange(count)]
    exact = core.nearest_identities(data)
    assert exact.method == "exact"
    np.testing.assert_array_equal(exact.index, twin)
    np.testing.assert_allclose(exact.similarity, np.einsum("ij,ij->i", data, data[twin]), atol=1e-5)
    monkeypatch.setattr(core, "EXACT_LIMIT", 1000)
    approximate = core.nearest_identities(data)
    assert approximate.method.startswith("ivf")
    assert (approximate.index == twin).mean() >= 0.99
    one = core.nearest_identities(data[:1])
    assert one.index.tolist() == [-1] and np.isnan(one.similarity[0])


def test_rivals_equal_a_loop_and_skip_the_label_and_its_twins(monkeypatch) -> None:
    """The rival: the most similar centre that is neither the image's label nor a twin of it (cosine to the
    label's centre at or above the twin threshold); none when the hits hold only those."""
    monkeypatch.setattr(core, "RIVAL_BATCH", 7)  # several batches
    rng = np.random.default_rng(5)
    people, _ = core.unit_rows(rng.normal(size=(30, 16)))
    twins, _ = core.unit_rows(people[:5] + 0.05 * rng.normal(size=(5, 16)))  # people 0-4 filed twice
    centres = np.vstack([people, twins])
    units, _ = core.unit_rows(centres[rng.integers(0, 35, size=40)] + 0.6 * rng.normal(size=(40, 16)))
    label = rng.integers(0, 35, size=40)
    label[:5] = [0, 30, 1, 31, 2]  # filed under a person who has a twin
    twin_similarity = 0.9
    index = core.CentreIndex(centres)
    found = core.rivals(index, centres, units, label, twin_similarity, hits=35)
    for row in range(len(units)):
        allowed = [
            c
            for c in range(len(centres))
            if c != label[row] and centres[c] @ centres[label[row]] < twin_similarity
        ]
        best = max(allowed, key=lambda c: units[row] @ centres[c])
        assert found.index[row] == best, row
        assert found.similarity[row] == pytest.approx(units[row] @ centres[best], abs=1e-5)
    assert {int(found.index[k]) for k in range(5)}.isdisjoint({0, 30, 1, 31, 2})  # never the label's twin
    # only the label and its twin among the hits: no rival
    lonely = core.rivals(index, centres, twins[:1], np.array([0]), twin_similarity, hits=2)
    assert lonely.index.tolist() == [-1] and np.isnan(lonely.similarity[0])


# ---- the command on planted problems ---------------------------------------------------------------------
PEOPLE = 12
PER_PERSON = 10


def planted_table(dimension: int = 24, seed: int = 7):
    """12 identities of 10 images around their own direction, with planted problems: each `p00` image
    k=9 filed under `p01` (mislabelled), `p02/img03` a near-copy of `p02/img01` with lower quality,
    `p04` filed twice (half its images as `p04b`), a decode error, a NaN score, a row without identity."""
    rng = np.random.default_rng(seed)
    people = rng.normal(size=(PEOPLE, dimension))
    ids, labels, vectors, quality = [], [], [], []
    for person in range(PEOPLE):
        for k in range(PER_PERSON):
            ids.append(f"p{person:02d}/img{k:02d}.jpg")
            labels.append(f"p{person:02d}")
            vectors.append(people[person] + 0.45 * rng.normal(size=dimension))
            quality.append(rng.uniform(0.2, 1.0))
    vectors = np.array(vectors)
    index = {image_id: k for k, image_id in enumerate(ids)}
    labels[index["p00/img09.jpg"]] = "p01"  # mislabelled
    vectors[index["p02/img03.jpg"]] = vectors[index["p02/img01.jpg"]] + 0.01 * rng.normal(size=dimension)
    quality[index["p02/img03.jpg"]] = quality[index["p02/img01.jpg"]] - 0.1
    for k in range(5):
        labels[index[f"p04/img{k:02d}.jpg"]] = "p04b"  # filed twice
    status = ["ok"] * len(ids)
    status[index["p05/img00.jpg"]] = "decode_error"
    quality[index["p05/img01.jpg"]] = float("nan")
    labels[index["p06/img00.jpg"]] = None
    exits = np.stack([quality, quality, quality], axis=1).astype(np.float32)
    table = synthetic_table(ids, status, exits, np.array(quality, dtype=np.float32), identity=labels)
    embeddings = pa.table({"image_id": ids, "embedding": pa.array(vectors.tolist(), pa.list_(pa.float32()))})
    return table, embeddings, index


def write_output(folder: Path, table: pa.Table) -> Path:
    (folder / "scores").mkdir(parents=True)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), folder / "scores" / "shard-00000.parquet")
    pq.write_table(table.slice(half), folder / "scores" / "shard-00001.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    return folder


def test_identities_finds_the_planted_problems(tmp_path: Path, capsys) -> None:
    table, embeddings, _ = planted_table()
    out = write_output(tmp_path / "out", table)
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    assert main(["identities", str(out), "--embeddings", str(tmp_path / "fr.parquet")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "119 images in 13 identities (117 with a score and an embedding" in printed
    assert "images without an identity, left out: 1" in printed and "outliers 1, near-duplicates 1" in printed
    images = pq.read_table(out / "curation" / "identity_images.parquet")
    assert images.schema == IDENTITY_IMAGES_SCHEMA
    rows = {row["image_id"]: row for row in images.to_pylist()}
    assert images.column("image_id").to_pylist() == sorted(rows)  # sorted by image_id
    assert len(rows) == 119 and "p06/img00.jpg" not in rows  # no identity: left out
    assert {i for i, row in rows.items() if row["outlier"]} == {"p00/img09.jpg"}
    assert {i: row["duplicate_of"] for i, row in rows.items() if row["duplicate_of"]} == {
        "p02/img03.jpg": "p02/img01.jpg"  # the better copy is kept
    }
    for unusable in ("p05/img00.jpg", "p05/img01.jpg"):  # a decode error, a NaN score
        assert rows[unusable]["similarity"] is None and not rows[unusable]["outlier"]
    assert rows["p01/img00.jpg"]["similarity"] > 0.5 > rows["p00/img09.jpg"]["similarity"]
    # the mislabelled image's rival is the person it shows: its right label
    assert rows["p00/img09.jpg"]["rival_identity"] == "p00"
    assert rows["p00/img09.jpg"]["rival_similarity"] > 0.5
    assert all(row["rival_identity"] is None for i, row in rows.items() if not row["outlier"])  # not searched

    identities = pq.read_table(out / "curation" / "identities.parquet")
    assert identities.schema == IDENTITIES_SCHEMA
    people = {row["identity"]: row for row in identities.to_pylist()}
    assert {name for name, row in people.items() if row["merge_candidate"]} == {"p04", "p04b"}
    assert people["p04"]["nearest_identity"] == "p04b" and people["p04b"]["nearest_identity"] == "p04"
    assert people["p01"] | {"nearest_identity": None, "nearest_similarity": None} == {
        "identity": "p01",
        "images": 11,
        "usable": 11,
        "outliers": 1,
        "duplicates": 0,
        "kept": 10,
        "nearest_identity": None,
        "nearest_similarity": None,
        "merge_candidate": False,
    }
    # the decode error and the NaN score: neither judged nor kept (select drops both)
    assert people["p05"]["usable"] == 8 and people["p05"]["kept"] == 8
    assert people["p02"]["kept"] == 9 and people["p06"]["images"] == 9
    summary = json.loads((out / "curation" / "identities.json").read_text())
    thresholds = summary["thresholds"]
    assert thresholds["source"]["outlier"].startswith("halfway between the median similarity")
    assert thresholds["source"]["margin"].startswith("halfway between the median rival margin")
    assert -1 < thresholds["margin"] < 0  # a correctly filed image is nearer its own centre than its rival's
    assert summary["below_similarity"] == 1
    assert -1 < thresholds["outlier"] < thresholds["merge"] < thresholds["duplicate"] < 1
    assert summary["outliers"] == 1 and summary["duplicates"] == 1 and summary["merge_candidates"] == 2

    # deterministic, and the user's thresholds win
    first = images.to_pylist()
    assert main(["identities", str(out), "--embeddings", str(tmp_path / "fr.parquet")]) == 0
    assert pq.read_table(out / "curation" / "identity_images.parquet").to_pylist() == first
    find_identities(
        str(out), embeddings=str(tmp_path / "fr.parquet"), outlier_similarity=-1.0, merge_similarity=1.0
    )
    again = pq.read_table(out / "curation" / "identity_images.parquet").to_pylist()
    assert not any(row["outlier"] for row in again)
    merges = pq.read_table(out / "curation" / "identities.parquet").column("merge_candidate")
    assert not any(merges.to_pylist())
    source = json.loads((out / "curation" / "identities.json").read_text())["thresholds"]["source"]
    assert source["outlier"] == source["merge"] == "set" and source["duplicate"].startswith("1 - 0.25")


def _read_rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "curation" / "identity_images.parquet")
    return {row["image_id"]: row for row in table.to_pylist()}


def test_an_image_far_from_every_centre_is_not_an_outlier_but_one_near_another_person_is(
    tmp_path: Path,
) -> None:
    """Below the similarity threshold, the rival decides: `a/img09` is degraded (far from every centre,
    its own included), `a/img08` shows `b`, `a/img07` shows nobody in the table (a stranger: farther from
    its own centre than a typical stranger's image is, it stays an outlier whatever its margin). With the
    rival test off (--outlier-margin 2), all three are outliers: the similarity alone cannot tell them
    apart. Identity `0` (sorted first) has no embedding at all: no centre, so identities and centres are
    numbered differently."""
    rng = np.random.default_rng(8)
    people, _ = core.unit_rows(rng.normal(size=(6, 32)))
    ids, labels, vectors = ["0/img00.jpg", "0/img01.jpg"], ["0", "0"], [np.zeros(32), np.zeros(32)]
    for person, name in enumerate("abcdef"):
        for k in range(10):
            ids.append(f"{name}/img{k:02d}.jpg")
            labels.append(name)
            vectors.append(people[person] + 0.08 * rng.normal(size=32))
    vectors = np.array(vectors)
    row = {image_id: k for k, image_id in enumerate(ids)}
    vectors[row["a/img08.jpg"]] = people[1] + 0.08 * rng.normal(size=32)  # shows b
    away = rng.normal(size=(2, 32))
    away -= (people.T @ np.linalg.lstsq(people.T, away.T, rcond=None)[0]).T  # orthogonal to every person
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    vectors[row["a/img09.jpg"]] = 0.45 * people[0] + away[0]  # degraded, still a
    vectors[row["a/img07.jpg"]] = away[1] - 0.3 * people[0]  # nobody in the table
    quality = np.linspace(1.0, 0.5, len(ids))
    table = synthetic_table(
        ids, ["ok"] * len(ids), np.stack([quality] * 3, axis=1).astype(np.float32), quality, identity=labels
    )
    out = write_output(tmp_path / "out", table)
    with_embedding = slice(2, None)  # identity 0's images have none
    pq.write_table(
        pa.table(
            {
                "image_id": ids[with_embedding],
                "embedding": pa.array(vectors[with_embedding].tolist(), pa.list_(pa.float32())),
            }
        ),
        tmp_path / "fr.parquet",
    )
    fr = str(tmp_path / "fr.parquet")
    summary = find_identities(str(out), embeddings=fr)
    rows = _read_rows(out)
    degraded, mislabelled, stranger = rows["a/img09.jpg"], rows["a/img08.jpg"], rows["a/img07.jpg"]
    threshold = summary.thresholds
    assert max(degraded["similarity"], mislabelled["similarity"], stranger["similarity"]) < threshold.outlier
    assert mislabelled["outlier"] and mislabelled["rival_identity"] == "b"
    assert not degraded["outlier"] and degraded["rival_identity"] not in (None, "a", "0")
    assert degraded["similarity"] - degraded["rival_similarity"] >= threshold.margin
    assert degraded["similarity"] >= threshold.stranger > stranger["similarity"]
    assert sorted(i for i, row in rows.items() if row["outlier"]) == ["a/img07.jpg", "a/img08.jpg"]
    assert summary.below_similarity == 3 and summary.outliers == 2
    assert rows["0/img00.jpg"]["similarity"] is None and not rows["0/img00.jpg"]["outlier"]
    people_rows = {
        row["identity"]: row for row in pq.read_table(out / "curation" / "identities.parquet").to_pylist()
    }
    assert (people_rows["a"]["outliers"], people_rows["a"]["kept"]) == (2, 8)  # the counts follow the rule
    assert summary.kept == len(ids) - 2  # identity 0's images are kept too (scored, no identity verdict)
    assert people_rows["0"]["nearest_identity"] is None

    # a permissive margin would clear the stranger too; its similarity keeps it an outlier
    loose = find_identities(str(out), embeddings=fr, outlier_margin=-0.8)
    rows = _read_rows(out)
    assert stranger["similarity"] - stranger["rival_similarity"] >= -0.8
    assert sorted(i for i, row in rows.items() if row["outlier"]) == ["a/img07.jpg", "a/img08.jpg"]
    assert loose.thresholds.source["margin"] == "set" and loose.thresholds.stranger == threshold.stranger

    off = find_identities(str(out), embeddings=fr, outlier_margin=2.0)
    rows = _read_rows(out)
    assert sorted(i for i, row in rows.items() if row["outlier"]) == [
        "a/img07.jpg",
        "a/img08.jpg",
        "a/img09.jpg",
    ]
    assert off.outliers == 3

    every = find_identities(str(out), embeddings=fr, all_rivals=True)
    rows = _read_rows(out)
    assert sorted(i for i, row in rows.items() if row["outlier"]) == [
        "a/img07.jpg",
        "a/img08.jpg",
    ]  # the same
    assert all(
        row["rival_identity"] not in (None, row["identity"]) for row in rows.values() if row["similarity"]
    )
    assert every.outliers == 2 and every.below_similarity == 3
    with pytest.raises(UserError, match="--outlier-margin"):
        find_identities(str(out), embeddings=fr, outlier_margin=3.0)


def test_one_identity_has_no_rival_and_the_similarity_alone_decides(tmp_path: Path) -> None:
    table, embeddings, _ = planted_table()
    only = pc.equal(table.column("identity"), "p01")
    out = write_output(tmp_path / "out", table.filter(only))  # p01 with the mislabelled p00/img09
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    summary = find_identities(
        str(out), embeddings=str(tmp_path / "fr.parquet"), outlier_similarity=0.5, merge_similarity=0.9
    )
    assert summary.thresholds.margin is None and summary.thresholds.stranger is None
    assert summary.thresholds.source["margin"].startswith("off: fewer than two identities")
    rows = _read_rows(out)
    assert [i for i, row in rows.items() if row["outlier"]] == ["p00/img09.jpg"]
    assert all(row["rival_identity"] is None for row in rows.values())


def test_select_drops_by_identity_rules_with_the_first_reason(tmp_path: Path, capsys) -> None:
    table, embeddings, index = planted_table()
    out = write_output(tmp_path / "out", table)
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    with pytest.raises(UserError, match="no identity results"):
        select(str(out), drop_outliers=True)
    find_identities(str(out), embeddings=str(tmp_path / "fr.parquet"))
    code = main(["select", str(out), "--drop-outliers", "--drop-duplicates", "--min-identity-images", "9"])
    assert code == 0
    keep = pq.read_table(out / "curation" / "keep.parquet").to_pylist()
    drop = {
        row["image_id"]: row["reason"] for row in pq.read_table(out / "curation" / "drop.parquet").to_pylist()
    }
    assert len(keep) + len(drop) == table.num_rows  # every row decided once
    assert drop["p00/img09.jpg"] == "identity outlier"
    assert drop["p02/img03.jpg"] == "near-duplicate of p02/img01.jpg"
    assert drop["p05/img00.jpg"] == "decode_error: broken"
    assert drop["p05/img01.jpg"] == "no finite quality score"
    # p00 lost its mislabelled image... it had 9 of its own; p04 and p04b have 5 each: too few
    small = {i for i, reason in drop.items() if reason.startswith("identity left with")}
    assert small == {f"p04/img{k:02d}.jpg" for k in range(10)} | {f"p05/img{k:02d}.jpg" for k in range(2, 10)}
    assert drop["p04/img00.jpg"] == "identity left with 5 images (fewer than 9)"
    selection = json.loads((out / "curation" / "selection.json").read_text())
    assert selection["dropped_outliers"] == 1 and selection["dropped_duplicates"] == 1
    assert selection["dropped_small_identities"] == 18 and selection["kept"] == len(keep)
    assert "p06/img00.jpg" in {row["image_id"] for row in keep}  # no identity: no identity rule applies

    # a quality rule comes first: the outlier, also below the quality threshold, says "low"
    outlier_quality = table.to_pydict()["quality"][index["p00/img09.jpg"]]
    select(str(out), min_quality=outlier_quality + 1e-6, drop_outliers=True)
    drop = {
        row["image_id"]: row["reason"] for row in pq.read_table(out / "curation" / "drop.parquet").to_pylist()
    }
    assert drop["p00/img09.jpg"] == f"quality < {outlier_quality + 1e-6:g}"

    # results of another table are refused
    pq.write_table(table.slice(0, 5), out / "scores" / "shard-00002.parquet")
    with pytest.raises(UserError, match="changed since `fiqa identities` ran"):
        select(str(out), drop_duplicates=True)
    capsys.readouterr()


def test_identities_reads_the_tables_own_embeddings_and_refuses_bad_ones(tmp_path: Path) -> None:
    table, embeddings, _ = planted_table(dimension=16)
    vectors = embeddings.column("embedding")
    own = write_output(tmp_path / "own", table.append_column("embedding", vectors))
    summary = find_identities(str(own))
    assert summary.embeddings == "the quality table" and summary.outliers == 1 and summary.duplicates == 1

    plain = write_output(tmp_path / "plain", table)
    with pytest.raises(UserError, match="no `embedding` column"):
        find_identities(str(plain))
    doubled = pa.concat_tables([embeddings, embeddings.slice(0, 2)])
    pq.write_table(doubled, tmp_path / "doubled.parquet")
    with pytest.raises(UserError, match="appear more than once \\(at least 2 extra row\\(s\\)\\)"):
        find_identities(str(plain), embeddings=str(tmp_path / "doubled.parquet"))
    assert not (plain / "curation").exists()
    from fiqa_curator.flows import identities as command

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(command, "PARTITION_SHARE", 1e-6)  # a partition per few identities: found all the same
        with pytest.raises(UserError, match="appear more than once"):
            find_identities(str(plain), embeddings=str(tmp_path / "doubled.parquet"), memory_limit="512MiB")
    # repeats of images the table does not have are not the table's business
    stranger = pa.table({"image_id": ["elsewhere.jpg"] * 2, "embedding": [vectors[0].as_py()] * 2})
    pq.write_table(
        pa.concat_tables([embeddings, stranger.cast(embeddings.schema)]), tmp_path / "more.parquet"
    )
    assert find_identities(str(plain), embeddings=str(tmp_path / "more.parquet")).outliers == 1
    ragged = pa.table({"image_id": ["p00/img00.jpg", "p00/img01.jpg"], "embedding": [[1.0, 0.0], [1.0]]})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    with pytest.raises(UserError, match="one length"):
        find_identities(str(plain), embeddings=str(tmp_path / "ragged.parquet"))
    with pytest.MonkeyPatch.context() as patch:  # checked on the joined rows of every bucket alike
        patch.setattr(command, "PARTITION_SHARE", 1e-6)
        with pytest.raises(UserError, match="one length; found 1 to 2"):
            find_identities(str(plain), embeddings=str(tmp_path / "ragged.parquet"), memory_limit="512MiB")
    elsewhere = pa.table({"image_id": ["x/1.jpg"], "embedding": [[1.0] * 16]})
    pq.write_table(elsewhere, tmp_path / "elsewhere.parquet")
    with pytest.raises(UserError, match="no image of the quality table with an identity has an embedding in"):
        find_identities(str(plain), embeddings=str(tmp_path / "elsewhere.parquet"))
    with pytest.raises(UserError, match="no such file"):
        find_identities(str(plain), embeddings=str(tmp_path / "missing.parquet"))
    nameless = table.set_column(
        table.schema.get_field_index("identity"), "identity", pa.nulls(table.num_rows, pa.string())
    )
    nobody = write_output(tmp_path / "nobody", nameless)
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    with pytest.raises(UserError, match="no image of the quality table has an identity"):
        find_identities(str(nobody), embeddings=str(tmp_path / "fr.parquet"))
    with pytest.raises(UserError, match="in \\[-1, 1\\]"):
        find_identities(str(plain), embeddings=str(tmp_path / "fr.parquet"), outlier_similarity=2.0)


@pytest.mark.s3
def test_identities_and_select_on_the_s3_server(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    import s3fs

    S3_OPTIONS = s3_server.storage_options

    table, embeddings, _ = planted_table()
    local = write_output(tmp_path / "out", table)
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **S3_OPTIONS)
    fs.put(str(local) + "/", f"{s3_bucket}/out/", recursive=True)
    fs.put(str(tmp_path / "fr.parquet"), f"{s3_bucket}/fr.parquet")
    out = f"s3://{s3_bucket}/out"
    summary = find_identities(out, embeddings=f"s3://{s3_bucket}/fr.parquet", storage_options=S3_OPTIONS)
    assert summary.outliers == 1 and summary.merge_candidates == 2
    selection = select(out, drop_outliers=True, drop_duplicates=True, storage_options=S3_OPTIONS)
    assert selection.dropped_outliers == 1 and selection.dropped_duplicates == 1
    with fs.open(f"{s3_bucket}/out/curation/identity_images.parquet") as handle:
        first = pq.read_table(handle)
    assert first.num_rows == 119
    from fiqa_curator.flows import identities as command

    with pytest.MonkeyPatch.context() as patch:  # many partitions: both sides read once, scattered locally
        patch.setattr(command, "PARTITION_SHARE", 1e-6)
        again = find_identities(
            out,
            embeddings=f"s3://{s3_bucket}/fr.parquet",
            storage_options=S3_OPTIONS,
            memory_limit="512MiB",  # 120 rows of 192 bytes in partitions of 537 bytes: about 43
            **summary_thresholds(summary),
        )
    assert again.work_partitions >= 8
    with fs.open(f"{s3_bucket}/out/curation/identity_images.parquet") as handle:
        assert pq.read_table(handle).equals(first)


def summary_thresholds(summary) -> dict[str, float]:
    """The thresholds a run used, as options (a second run with them judges alike whatever its samples)."""
    return {
        f"{name}_similarity": getattr(summary.thresholds, name) for name in ("outlier", "duplicate", "merge")
    }


# ---- real faces: the validation, smaller ---------------------------------------------------------------
@pytest.mark.slow
def test_label_noise_on_real_faces_with_dlib_embeddings(tmp_path: Path) -> None:
    """8 held-out sample faces, clean and degraded (severities 1, 2, 4), scored by the bundled model,
    dlib's 128-d embeddings; 5% of the labels swapped, 2 identities filed twice. The whole sample set is
    in benchmarks/validate_identities.py (docs/benchmarks.md)."""
    from fiqa_curator.demo_kit.build import degraded_set, split_faces
    from fiqa_curator.demo_kit.faces import source_faces
    from fiqa_curator.demo_kit.identity_noise import check
    from fiqa_curator.demo_kit.utility import fr_embeddings
    from fiqa_curator.workers import QualityScorer, load_model
    from fiqa_curator.workers.assets import BUNDLED_CHECKPOINT

    faces = source_faces()
    test = split_faces(faces)
    sample = degraded_set([face for face in faces if test[face.face_id] == "test"][:8], severities=(1, 2, 4))
    scores = QualityScorer(load_model(BUNDLED_CHECKPOINT), device="cpu").score(sample.images)
    identity = [sample.faces[k].face_id for k in sample.face_index]
    table = synthetic_table(
        sample.image_ids, ["ok"] * len(identity), scores.exit_scores, scores.fused["fw"], identity=identity
    )
    quality = write_output(tmp_path / "quality", table)
    embeddings = fr_embeddings(sample.images)
    pq.write_table(
        pa.table(
            {"image_id": sample.image_ids, "embedding": pa.array(list(embeddings), pa.list_(pa.float32()))}
        ),
        tmp_path / "fr.parquet",
    )
    severity = dict(zip(sample.image_ids, sample.severity.tolist(), strict=True))
    result = check(
        quality, tmp_path / "fr.parquet", severity, tmp_path / "noisy", find_identities, seed=0, split=2
    )
    assert result["images"] == 8 * 34 and result["swapped"] == 14
    for name in ("weighted", "unweighted"):
        figures = result[name]
        # every identity filed twice is found, paired with its twin, and nothing else
        assert figures["merges"] == {"precision": 1.0, "recall": 1.0, "flagged": 4, "truth": 4}
        mild = figures["outliers"]["clean+mild"]
        assert mild["truth"] >= 8 and mild["recall"] == 1.0  # every mislabelled clean or mild image
        # measured 1.0 both ways: the overexposed or occluded faces at severity 2 that look to dlib more
        # like a stranger than like themselves (0.92 and 0.85 by the similarity alone) are nearer their own
        # centre than any rival's
        assert mild["precision"] >= 0.9, mild
        assert figures["margin_auc"]["clean+mild"] >= 0.99 and figures["auc"]["clean+mild"] >= 0.99
        assert figures["margin_auc"]["degraded"] >= 0.9  # mislabelled heavy degradations: still mostly apart
    # quality weighting tells the mislabelled heavy degradations apart better (measured 0.957 against 0.949)
    assert result["weighted"]["margin_auc"]["degraded"] > result["unweighted"]["margin_auc"]["degraded"]
    thresholds = result["weighted"]["thresholds"]
    assert 0.85 < thresholds["outlier"] < thresholds["merge"] < thresholds["duplicate"] < 1.0  # dlib's scale


def test_report_shows_the_worst_identities_and_merge_candidates(tmp_path: Path) -> None:
    from fiqa_curator.flows.report import build_report

    table, embeddings, _ = planted_table()
    hostile = '<img src=x onerror="alert(1)">'
    labels = table.column("identity").to_pylist()
    labels = [hostile if label == "p01" else label for label in labels]  # the identity with the outlier
    table = table.set_column(
        table.schema.get_field_index("identity"), "identity", pa.array(labels, pa.string())
    )
    out = write_output(tmp_path / "out", table)
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    page, summary = build_report(str(out))
    assert "Identity curation" not in page  # nothing to show before `fiqa identities`
    find_identities(str(out), embeddings=str(tmp_path / "fr.parquet"))
    page, summary = build_report(str(out))
    section = page.split('<section id="identities">')[1].split("</section>")[0]
    assert "Identity curation (fiqa identities)" in section
    assert hostile not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in section
    assert "1 of 11 images are outliers" in section  # the identity with the mislabelled image
    assert section.count("nearest the centre") == 1 and "p00/img09.jpg" in section.split("farthest")[1]
    assert "p04 and p04b: centres at cosine" in section
    assert summary["identity_curation"] == {
        "identities": 13,
        "outliers": 1,
        "duplicates": 1,
        "kept": 115,
        "merge_candidates": 2,
    }
    # a rescored table makes the results stale: the report leaves them out
    pq.write_table(table.slice(0, 3), out / "scores" / "shard-00002.parquet")
    page, summary = build_report(str(out))
    assert "Identity curation" not in page and "identity_curation" not in summary


def test_results_do_not_depend_on_partitions_or_read_batches(tmp_path: Path, monkeypatch) -> None:
    from fiqa_curator.flows import identities as command

    table, embeddings, _ = planted_table()
    out = write_output(tmp_path / "out", table)
    # two images without an embedding, and embeddings of images the table does not have
    missing = pc.is_in(embeddings.column("image_id"), pa.array(["p03/img02.jpg", "p07/img05.jpg"]))
    strangers = pa.table({"image_id": [f"x/{k}.jpg" for k in range(30)], "embedding": [[1.0] * 24] * 30})
    embeddings = pa.concat_tables([embeddings.filter(pc.invert(missing)), strangers.cast(embeddings.schema)])
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    fixed = {
        "outlier_similarity": 0.45,
        "merge_similarity": 0.7,
        "outlier_margin": -0.2,
        "memory_limit": "512MiB",
    }
    derived = find_identities(str(out), embeddings=str(tmp_path / "fr.parquet")).thresholds
    first = find_identities(str(out), embeddings=str(tmp_path / "fr.parquet"), **fixed)
    names = ("identity_images.parquet", "identities.parquet")
    expected = [pq.read_table(out / "curation" / name) for name in names]
    monkeypatch.setattr(command, "CHUNK_ROWS", 7)  # identities cut across reads: carried over
    monkeypatch.setattr(command, "PARTITION_SHARE", 1e-6)  # about 43 partitions of whole identities
    cut = find_identities(str(out), embeddings=str(tmp_path / "fr.parquet"), **fixed)
    assert first.work_partitions == 1 and cut.work_partitions >= 8
    assert cut.usable == first.usable == first.images - 4  # the decode error, the NaN score, 2 without
    for name, table_before in zip(names, expected, strict=True):
        assert pq.read_table(out / "curation" / name).equals(table_before), name
    assert cut.outliers == first.outliers == 1 and cut.duplicates == first.duplicates > 0
    again = find_identities(str(out), embeddings=str(tmp_path / "fr.parquet")).thresholds
    for name in ("outlier", "merge", "duplicate", "margin", "stranger"):  # the draws come in another order
        assert getattr(again, name) == pytest.approx(getattr(derived, name), abs=0.03), name


class RecordingConnection:
    """A DuckDB connection that keeps the SQL it was given."""

    def __init__(self, connection) -> None:
        self._connection = connection
        self.statements: list[str] = []

    def execute(self, query: str, *args, **kwargs):
        self.statements.append(query)
        return self._connection.execute(query, *args, **kwargs)

    def sql(self, query: str, *args, **kwargs):
        self.statements.append(query)
        return self._connection.sql(query, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._connection, name)


def test_many_partitions_read_each_input_once(tmp_path: Path, monkeypatch) -> None:
    """The join into many work partitions scans the embeddings and the table once each (they used to be
    read once per partition: rows x rows / memory), and leaves no bucket file behind."""
    import contextlib

    from fiqa_curator.flows import identities as command

    table, embeddings, _ = planted_table()
    out = write_output(tmp_path / "out", table)
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    connections: list[RecordingConnection] = []
    real_connect = command.connect

    @contextlib.contextmanager
    def recording_connect(*args, **kwargs):
        with real_connect(*args, **kwargs) as connection:
            connections.append(RecordingConnection(connection))
            yield connections[-1]

    work_files: list[list[str]] = []
    real_sorted_batches = command._sorted_batches

    def sorted_batches(connection, parts):
        work_files.append(sorted(p.name for p in Path(parts[0]).parent.iterdir()))
        return real_sorted_batches(connection, parts)

    monkeypatch.setattr(command, "connect", recording_connect)
    monkeypatch.setattr(command, "_sorted_batches", sorted_batches)
    monkeypatch.setattr(command, "PARTITION_SHARE", 1e-6)  # about 43 partitions of whole identities
    summary = find_identities(str(out), embeddings=str(tmp_path / "fr.parquet"), memory_limit="512MiB")
    assert summary.work_partitions >= 8 and summary.outliers == 1
    statements = connections[0].statements
    # besides the columns' names and the first embedding's length (a row's bytes)
    embedding_scans = [
        q for q in statements if "fr.parquet" in q and not q.startswith("DESCRIBE") and "LIMIT 1" not in q
    ]
    assert len(embedding_scans) == 1, embedding_scans
    assert len([q for q in statements if "FROM scores WHERE coalesce(identity" in q]) == 1
    assert work_files and all(name.startswith("part-") for name in work_files[0])
    assert len(work_files[0]) == summary.work_partitions


def test_thresholds_from_a_sample_that_stops_early_with_many_partitions(tmp_path: Path, monkeypatch) -> None:
    """The thresholds' sample stops reading the partitions early (SAMPLE_ROWS); the judging pass then reads
    them all on the same connection: nothing of the sample's reading may be left open."""
    from fiqa_curator.flows import identities as command

    table, embeddings, _ = planted_table()
    out = write_output(tmp_path / "out", table)
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    monkeypatch.setattr(command, "SAMPLE_ROWS", 25)  # stops inside the partitions
    monkeypatch.setattr(command, "PARTITION_SHARE", 1e-6)
    monkeypatch.setattr(command, "CHUNK_ROWS", 7)
    summary = find_identities(str(out), embeddings=str(tmp_path / "fr.parquet"), memory_limit="512MiB")
    assert summary.work_partitions >= 8
    sampled = int(summary.thresholds.source["outlier"].split(" of ")[1].split()[0])
    assert 0 < sampled < summary.usable  # the sample stopped before the end
    images = pq.read_table(out / "curation" / "identity_images.parquet")
    assert images.num_rows == summary.images  # the judging pass read every partition whole


def test_a_duplicate_stays_when_its_copy_was_dropped_by_an_earlier_rule(tmp_path: Path) -> None:
    table, embeddings, index = planted_table()
    exits = table.column("exit_scores").to_pylist()  # lists; null for the decode error
    exits[index["p02/img01.jpg"]][0] = -5.0  # the copy kept by `fiqa identities` is low by exit 1...
    exits[index["p02/img03.jpg"]][0] = 5.0  # ...its near-duplicate high
    column = table.schema.get_field_index("exit_scores")
    table = table.set_column(
        column, table.schema.field(column), pa.array(exits, table.schema.field(column).type)
    )
    out = write_output(tmp_path / "out", table)
    pq.write_table(embeddings, tmp_path / "fr.parquet")
    find_identities(str(out), embeddings=str(tmp_path / "fr.parquet"))
    selection = select(str(out), min_quality=-1.0, by="exit_1", drop_duplicates=True)
    drop = {
        row["image_id"]: row["reason"] for row in pq.read_table(out / "curation" / "drop.parquet").to_pylist()
    }
    assert drop["p02/img01.jpg"] == "exit_1 < -1"
    assert "p02/img03.jpg" not in drop and selection.dropped_duplicates == 0  # one copy of the two stays
    selection = select(str(out), min_quality=-10.0, by="exit_1", drop_duplicates=True)
    drop = {
        row["image_id"]: row["reason"] for row in pq.read_table(out / "curation" / "drop.parquet").to_pylist()
    }
    assert drop["p02/img03.jpg"] == "near-duplicate of p02/img01.jpg" and selection.dropped_duplicates == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM: Linux only")
def test_the_peak_memory_recorded_is_the_commands_own_not_its_parents() -> None:
    """`identities.json`'s peak RSS per stage: a command started by a process that held 600 MB (a
    benchmark that built its data first) does not report that process's peak (ru_maxrss would)."""
    import subprocess

    held = bytearray(600 << 20)
    held[::4096] = b"\x01" * len(held[::4096])  # touched: resident
    code = (
        "import resource; from fiqa_curator.flows.identities import _peak_rss_mb; "
        "print(_peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    own, inherited = map(float, subprocess.check_output([sys.executable, "-c", code], text=True).split())
    del held
    assert inherited > 600 and own < 400
