"""`fiqa evaluate` end to end on generated tables: methods, pairs, embeddings, both protocols, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fiqa_curator.evaluation.edc import (
    ErcCurves,
    angular_distance,
    cosine_similarity,
    iso_curve,
    iso_threshold,
    pair_quality,
)
from fiqa_curator.flows.cli import main
from fiqa_curator.schemas import build_quality_table
from fiqa_curator.workers import ViTFIQAConfig


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    """40 identities x 5 images; an image's embedding drifts from its identity by its (hidden) degradation."""
    rng = np.random.default_rng(0)
    identities, per_identity, dim = 40, 5, 32
    centres = rng.normal(size=(identities, dim))
    ids, embeddings, degradation = [], [], []
    for person in range(identities):
        for k in range(per_identity):
            level = rng.uniform(0, 3)
            ids.append(f"p{person:02d}/img{k}.png")
            embeddings.append(centres[person] + level * rng.normal(size=dim))
            degradation.append(level)
    degradation = np.array(degradation)
    pairs_a, pairs_b, genuine = [], [], []
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            same = ids[i][:3] == ids[j][:3]
            if same or rng.random() < 0.05:
                pairs_a.append(ids[i])
                pairs_b.append(ids[j])
                genuine.append(same)
    pairs_a.append(ids[0])
    pairs_b.append("missing/embedding.png")  # no embedding for this one: dropped and counted
    genuine.append(False)
    quality = {"informed": -degradation, "random": rng.normal(size=len(ids))}
    quality["random"][5] = np.nan  # a failed image: its pairs are dropped
    pq.write_table(pa.table({"image_id": ids, **quality}), tmp_path / "quality.parquet")
    pq.write_table(
        pa.table({"image_id": ids, "embedding": [e.tolist() for e in embeddings]}),
        tmp_path / "embeddings.parquet",
    )
    pq.write_table(
        pa.table({"image_id_a": pairs_a, "image_id_b": pairs_b, "genuine": genuine}),
        tmp_path / "pairs.parquet",
    )
    return {
        "ids": ids,
        "embeddings": np.array(embeddings),
        "quality": quality,
        "pairs": (pairs_a, pairs_b, genuine),
        "path": tmp_path,
    }


def run_json(capsys, *args: str) -> dict:
    assert main([str(a) for a in args]) == 0
    return json.loads(capsys.readouterr().out)


def _expected_inputs(dataset: dict):
    index = {image_id: i for i, image_id in enumerate(dataset["ids"])}
    a_list, b_list, genuine = dataset["pairs"]
    keep = [
        k
        for k, (a, b) in enumerate(zip(a_list, b_list, strict=True))
        if a in index and b in index and 5 not in (index[a], index[b])
    ]
    ia = np.array([index[a_list[k]] for k in keep])
    ib = np.array([index[b_list[k]] for k in keep])
    similarity = cosine_similarity(dataset["embeddings"][ia], dataset["embeddings"][ib])
    return keep, ia, ib, similarity, np.array(genuine)[keep]


def _files(path: Path) -> list:
    """The dataset's quality, pairs and embeddings, as `fiqa evaluate` arguments."""
    return ["--quality", path / "quality.parquet", "--pairs", path / "pairs.parquet",
            "--embeddings", path / "embeddings.parquet"]  # fmt: skip


def test_erc_json_matches_the_protocol_and_ranks_methods(dataset: dict, capsys) -> None:
    path = dataset["path"]
    result = run_json(
        capsys,
        "evaluate",
        *_files(path),
        "--protocol",
        "erc",
        "--fmr",
        "1e-1,1e-2",
        "--json",
    )
    keep, ia, ib, similarity, genuine = _expected_inputs(dataset)
    assert result["pairs"] == len(dataset["pairs"][0]) and result["pairs_used"] == len(keep)
    assert result["pairs_dropped"] == len(dataset["pairs"][0]) - len(keep) > 1
    curves = ErcCurves(angular_distance(similarity), genuine)
    for method in ("informed", "random"):
        q = dataset["quality"][method]
        expected = curves.evaluate(pair_quality(q[ia], q[ib]), (1e-1, 1e-2))
        for fmr in (1e-1, 1e-2):
            got = result["methods"][method][f"{fmr:g}"]
            np.testing.assert_array_equal(got["fnmr"], expected.fnmr[fmr])
            assert got["pauc"] == pytest.approx(expected.pauc(fmr, 0.3)) and "pauc@0.2" in got
            assert len(got["discard_fractions"]) == 20
    assert result["methods"]["informed"]["0.1"]["pauc"] < result["methods"]["random"]["0.1"]["pauc"]


def test_iso_json_with_fmr_thresholds_and_starting_error(dataset: dict, capsys) -> None:
    path = dataset["path"]
    common = [
        "evaluate",
        *_files(path),
        "--protocol",
        "iso",
        "--json",
    ]
    by_fmr = run_json(capsys, *common, "--fmr", "1e-2")
    _, ia, ib, similarity, genuine = _expected_inputs(dataset)
    threshold = iso_threshold(similarity[genuine], similarity[~genuine], fmr=1e-2)
    q = dataset["quality"]["informed"]
    curve = iso_curve(similarity[genuine], pair_quality(q[ia], q[ib])[genuine], threshold)
    got = by_fmr["methods"]["informed"]["0.01"]
    assert got["threshold"] == pytest.approx(threshold)
    np.testing.assert_allclose(got["fnmr"], curve.error_fractions)
    assert got["pauc"] == pytest.approx(curve.pauc(0.3))
    assert got["pauc_minus_best"] == pytest.approx(curve.pauc(0.3, minus_theoretical_best=True))
    by_start = run_json(capsys, *common, "--starting-error", "0.1")
    assert list(by_start["methods"]["informed"]) == ["starting_error=0.1"]
    assert by_start["methods"]["informed"]["starting_error=0.1"]["fnmr"][0] == pytest.approx(0.1, abs=0.02)


def _fake_fiqa_output(dataset: dict, tmp_path: Path, *, shards: int = 1, embeddings: bool = False) -> dict:
    """A fiqa OUTPUT with 3 exits: exits 1 and 2 are noise, exit 3 knows the degradation (in `shards`
    shards; with the dataset's embeddings, as `fiqa score --embeddings` stores them, when asked)."""
    ids = dataset["ids"]
    rng = np.random.default_rng(1)
    exits = rng.normal(size=(len(ids), 3)).astype(np.float32)
    exits[:, 2] = np.asarray(dataset["quality"]["informed"], dtype=np.float32)  # = -degradation
    status = np.array(["ok"] * len(ids), dtype=object)
    status[7] = "decode_error"
    (tmp_path / "run" / "scores").mkdir(parents=True)
    for shard, rows in enumerate(np.array_split(np.arange(len(ids)), shards)):
        table = build_quality_table(
            {
                "image_id": [ids[i] for i in rows],
                "source": [ids[i] for i in rows],
                "status": status[rows],
                "error": [""] * len(rows),
                "byte_size": [1] * len(rows),
                "width": [112] * len(rows),
                "height": [112] * len(rows),
                "resized": [False] * len(rows),
                "exit_scores": exits[rows],
                "quality_final": exits[rows, 2],
                "quality_f": exits[rows].mean(1),
                "quality_fw": exits[rows] @ np.array([1, 2, 3]) / 6,
                "quality": exits[rows] @ np.array([1, 2, 3]) / 6,
                "embedding": dataset["embeddings"][rows] if embeddings else None,
                "model_sha256": "x",
                "run_id": "r",
                "shard": f"shard-{shard:05d}",
            },
            metadata={"fusion": "fw"},
        )
        pq.write_table(table, tmp_path / "run" / "scores" / f"shard-{shard:05d}.parquet")
    model_config = {"mode": "token", "embed_dim": 512, "depth": 3, "num_heads": 8}
    (tmp_path / "run" / "_run.json").write_text(json.dumps({"config": {"model_config": model_config}}))
    return model_config


def test_fiqa_output_gives_every_exit_and_fusion(dataset: dict, capsys, tmp_path: Path) -> None:
    model_config = _fake_fiqa_output(dataset, tmp_path)
    path = dataset["path"]
    result = run_json(
        capsys,
        "evaluate",
        "--quality",
        tmp_path / "run",
        "--pairs",
        path / "pairs.parquet",
        "--embeddings",
        path / "embeddings.parquet",
        "--fmr",
        "1e-1",
        "--json",
        "--output",
        tmp_path / "evaluation",
    )
    assert (tmp_path / "evaluation" / "pauc_vs_gflops.png").stat().st_size > 1000
    per_depth = {f"{scheme}@{depth}" for scheme in ("f", "fw") for depth in (1, 2, 3)}
    assert set(result["methods"]) == {
        "exit_1",
        "exit_2",
        "exit_3",
        "quality_final",
        "quality_f",
        "quality_fw",
        *per_depth,
    }
    assert result["methods"]["exit_3"] == result["methods"]["quality_final"]
    assert result["methods"]["fw@3"]["0.1"]["pauc"] == pytest.approx(
        result["methods"]["quality_fw"]["0.1"]["pauc"]
    )
    # the advisor: the shallowest depth whose best option is within 5% of the best, and what it saves
    advice = result["advisor"]
    chosen = advice["recommended"]["exit_depth"]
    limit = advice["best"]["pauc"] * 1.05
    assert advice["operating_point"] == "0.1" and advice["recommended"]["pauc"] <= limit
    assert all(advice["per_depth"][str(depth)]["pauc"] > limit for depth in range(1, chosen))
    config = ViTFIQAConfig.from_dict(model_config)
    assert advice["recommended"]["compute_saved"] == pytest.approx(
        1 - config.flops_at_exit(chosen) / config.flops_at_exit(3)
    )


def test_human_table_and_errors(dataset: dict, capsys) -> None:
    path = dataset["path"]

    def evaluate(pairs: str, *extra: str) -> int:
        return main(["evaluate", "--quality", str(path / "quality.parquet"), "--pairs", str(path / pairs),
                     "--embeddings", str(path / "embeddings.parquet"), *extra])  # fmt: skip

    assert evaluate("pairs.parquet") == 0
    printed = capsys.readouterr().out
    assert "pAUC up to 0.3" in printed and "informed" in printed and "pairs used" in printed
    assert "depends on the order of the pairs file" in printed  # its pairs tie across boundaries
    assert evaluate("quality.parquet") == 2
    assert "pairs need" in capsys.readouterr().out
    assert evaluate("pairs.parquet", "--methods", "nope") == 2
    assert "unknown methods" in capsys.readouterr().out


def test_advisor_picks_the_shallowest_depth_within_tolerance() -> None:
    from fiqa_curator.evaluation.advisor import advise, depth_fusions

    pauc = {
        "exit_1": 0.30,
        "exit_2": 0.20,
        "f@2": 0.104,
        "fw@2": 0.12,
        "exit_3": 0.11,
        "fw@3": 0.10,
        "exit_4": 0.101,
        "quality": 0.05,
    }  # `quality` is not a per-depth option: ignored
    advice = advise(pauc, tolerance=0.05, gflops_at=lambda depth: 1.0 * depth)
    assert advice["best"]["option"] == "fw@3"
    assert advice["recommended"]["option"] == "f@2" and advice["recommended"]["exit_depth"] == 2
    assert advice["recommended"]["compute_saved"] == pytest.approx(0.5)  # 2 of 4 blocks
    assert advise(pauc, tolerance=0.0)["recommended"]["option"] == "fw@3"
    with pytest.raises(ValueError):
        advise({"quality": 0.1})
    fused = depth_fusions(np.array([[1.0, 2.0, 4.0]]))
    assert fused["f@2"][0] == pytest.approx(1.5) and fused["fw@3"][0] == pytest.approx((1 + 4 + 12) / 6)


def test_output_folder_holds_json_tables_and_plots(dataset: dict, capsys, tmp_path: Path) -> None:
    from PIL import Image

    path = dataset["path"]
    out = tmp_path / "evaluation"
    result = run_json(
        capsys,
        "evaluate",
        *_files(path),
        "--fmr",
        "1e-1,1e-2",
        "--json",
        "--output",
        out,
    )
    assert json.loads((out / "result.json").read_text()) == result
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert {(row["method"], row["operating_point"]) for row in summary} == {
        (m, p) for m in ("informed", "random") for p in ("0.1", "0.01")
    }
    informed = next(r for r in summary if r["method"] == "informed" and r["operating_point"] == "0.1")
    assert informed["pauc"] == result["methods"]["informed"]["0.1"]["pauc"]
    curves = pq.read_table(out / "curves.parquet")
    assert curves.num_rows == 2 * 2 * 20
    with Image.open(out / "edc.png") as image:
        assert image.format == "PNG" and image.width > 500


def test_fusion_weights_are_fitted_on_one_half_and_reported_on_the_other(
    dataset: dict, capsys, tmp_path: Path
) -> None:
    from fiqa_curator.workers import parse_fusion

    _fake_fiqa_output(dataset, tmp_path)
    path = dataset["path"]
    command = ["evaluate", "--quality", tmp_path / "run", "--pairs", path / "pairs.parquet", "--embeddings"]
    command += [path / "embeddings.parquet", "--fmr", "1e-1", "--advise-fmr", "0.1", "--fit-fusion", "--json"]
    result = run_json(capsys, *command, "--output", tmp_path / "evaluation")
    fit = result["fusion_fit"]
    weights = np.array(fit["weights"])
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0)
    assert int(np.argmax(weights)) == 2  # the informative exit
    assert fit["fit_pairs"] > 0 and fit["heldout_pairs"] > 0
    # F and FW are among the search's starting points: on the fitting half it can only do better
    assert fit["fit_pauc"]["fitted"] <= min(fit["fit_pauc"]["f"], fit["fit_pauc"]["fw"])
    assert set(fit["heldout_pauc"]) == {"fitted", "f", "fw"}  # the honest comparison, reported as it is
    assert all(0 <= value <= 1 for value in fit["heldout_pauc"].values())
    assert parse_fusion(fit["fusion"]).weights(3) == pytest.approx(weights, abs=1e-5)  # usable as --fusion
    saved = json.loads((tmp_path / "evaluation" / "fusion_weights.json").read_text())
    assert saved["fusion"] == fit["fusion"]
    again = run_json(capsys, *command)
    assert again["fusion_fit"] == fit  # seeded: the same weights every time


@pytest.mark.slow
def test_end_to_end_on_the_demo_dataset_with_dlib_and_own_embeddings(
    tmp_path: Path, run_score, capsys
) -> None:
    """Sample faces -> the demo model through the pipeline (with its own embeddings) -> EDC against dlib's
    recogniser and against the model's embeddings -> curves and the advisor in the report."""
    from fiqa_curator.demo_kit.build import build_sample_set
    from fiqa_curator.flows.evaluate import run_evaluation
    from fiqa_curator.flows.report import build_report

    manifest = build_sample_set(tmp_path / "data", max_faces=4, severities=(1, 3, 5), log=lambda _: None)
    quality = tmp_path / "quality"
    summary, rows = run_score(manifest, quality, embeddings=True, report=False)
    assert summary.counts == {"ok": 4 * (1 + 11 * 3)}

    result, written, _ = run_evaluation(
        str(quality),
        str(tmp_path / "data" / "pairs.parquet"),
        embeddings=str(tmp_path / "data" / "fr_embeddings.parquet"),
        output=str(quality / "evaluation"),
    )
    assert {"result.json", "edc.png", "pauc_vs_gflops.png", "curves.parquet"} <= set(written)
    assert {f"exit_{d}" for d in range(1, 13)} <= set(result["methods"]) and "fw@12" in result["methods"]
    assert result["pairs_used"] == result["pairs"] == 136 * 4 - 4
    # the demo model's ranking is real: discarding its lowest-scored images removes false non-matches
    curve = result["methods"]["quality_fw"]["0.01"]
    assert curve["fnmr"][0] > 0 and curve["fnmr"][6] < curve["fnmr"][0]  # 30% discarded vs none
    assert 1 <= result["advisor"]["recommended"]["exit_depth"] <= 12

    page, report = build_report(str(quality))
    assert 'id="evaluation"' in page and 'id="advisor"' in page and page.count("data:image/png;base64,") >= 2
    assert report["advisor"]["exit_depth"] == result["advisor"]["recommended"]["exit_depth"]

    # with the model's own embeddings (the demo model's embedding head is untrained: mechanics, not accuracy)
    own, _, _ = run_evaluation(str(quality), str(tmp_path / "data" / "pairs.parquet"))
    assert own["pairs_used"] == result["pairs_used"] and set(own["methods"]) == set(result["methods"])
    assert len(rows[next(iter(rows))]["embedding"]) == 64


# ---- erc: ties that make the pAUC depend on the pairs file's order ----------------------------------------
def _pairs_with_qualities(tmp_path: Path, pair_qualities: dict[str, np.ndarray]) -> list:
    """One pair per entry, each with two images of its own: image a carries the pair quality wanted, image b
    a higher one, so min(a, b) is exactly that pair quality. The pairs file is in a shuffled order."""
    rng = np.random.default_rng(5)
    count = len(next(iter(pair_qualities.values())))
    ids = [f"pair{k:03d}/{side}.png" for k in range(count) for side in "ab"]
    quality = {name: np.ravel(np.stack([q, q + 1000.0], axis=1)) for name, q in pair_qualities.items()}
    pq.write_table(pa.table({"image_id": ids, **quality}), tmp_path / "quality.parquet")
    vectors = rng.normal(size=(2 * count, 8))
    pq.write_table(
        pa.table({"image_id": ids, "embedding": vectors.tolist()}), tmp_path / "embeddings.parquet"
    )
    order = rng.permutation(count)
    pairs = {
        "image_id_a": [ids[2 * k] for k in order],
        "image_id_b": [ids[2 * k + 1] for k in order],
        "genuine": (order % 3 == 0).tolist(),
    }
    pq.write_table(pa.table(pairs), tmp_path / "pairs.parquet")
    return _files(tmp_path)


def test_erc_says_when_ties_straddle_a_discard_boundary(tmp_path: Path, capsys) -> None:
    from fiqa_curator.flows.evaluate import tie_warnings
    from tests.test_edc import tied_across_a_boundary

    # 60 pairs: the cuts up to 0.3 are k = 0, 3, 6, ..., 18 (0.35 adds 21). In sorted order, equal
    # qualities at positions 5..7 (straddle 6: 3 pairs), 9..11 (starts and ends on the cuts 9 and 12:
    # harmless) and 16..22 (straddle 18, and 21 beyond the limit: 7 pairs); `distinct` has no tie at all.
    tied = np.arange(60.0)
    for first, end in ((5, 8), (9, 12), (16, 23)):
        tied[first:end] = first
    files = _pairs_with_qualities(tmp_path, {"tied": tied, "distinct": np.arange(60.0)[::-1]})
    expected = tied_across_a_boundary(tied, 0.3)
    assert expected == 3 + 7  # the count by hand, and by the definition

    result = run_json(capsys, "evaluate", *files, "--protocol", "erc", "--json")  # JSON-serialisable
    found = result["order_dependent"]
    assert found["discard_limit"] == 0.3 and set(found["methods"]) == {"tied"}
    assert found["methods"]["tied"]["pairs"] == expected
    assert [b["discard_fraction"] for b in found["methods"]["tied"]["boundaries"]] == [0.1, 0.3]
    lines = tie_warnings(result)
    assert len(lines) == 2 and "1 of 2 method(s)" in lines[0] and "order of the pairs file" in lines[0]
    assert lines[1] == "  tied: 10 of 60 pairs tied across a boundary (at discard fractions 0.1, 0.3)"

    # up to 0.35, the cut at 21 splits the same group again: still 10 pairs, a third boundary
    wider = run_json(capsys, "evaluate", *files, "--discard-limit", "0.35", "--json")["order_dependent"]
    assert wider["methods"]["tied"]["pairs"] == 10 and len(wider["methods"]["tied"]["boundaries"]) == 3

    clean = run_json(capsys, "evaluate", *files, "--methods", "distinct", "--json")
    assert clean["order_dependent"] == {"discard_limit": 0.3, "methods": {}} and tie_warnings(clean) == []

    iso = run_json(capsys, "evaluate", *files, "--protocol", "iso", "--fmr", "0.5", "--json")
    assert "order_dependent" not in iso and tie_warnings(iso) == []


# ---- loading only what the pairs name ------------------------------------------------------------------
def _assert_same_rows(bounded: tuple, full: tuple, wanted: set) -> None:
    """`bounded` holds exactly the rows of `full` whose image is wanted, in table order, same values."""
    (ids, methods), (full_ids, full_methods) = bounded, full
    rows = [i for i, image_id in enumerate(full_ids) if image_id in wanted]
    assert ids == [full_ids[i] for i in rows] and 0 < len(ids) < len(full_ids)
    assert list(methods) == list(full_methods)
    for name, values in methods.items():
        np.testing.assert_array_equal(values, full_methods[name][rows])


def test_loaders_read_only_the_rows_of_the_given_images(dataset: dict, tmp_path: Path) -> None:
    from fiqa_curator.evaluation.run import load_embeddings, load_methods
    from fiqa_curator.schemas.errors import UserError

    _fake_fiqa_output(dataset, tmp_path, shards=3, embeddings=True)
    path = dataset["path"]
    ids = dataset["ids"]
    wanted = {ids[3], ids[7], ids[70], ids[71], ids[150], ids[199], "not/in/any/table.png"}  # 7: failed
    pq.read_table(path / "quality.parquet").to_pandas().to_csv(path / "quality.csv", index=False)
    for url in (path / "quality.parquet", path / "quality.csv", tmp_path / "run"):
        _assert_same_rows(load_methods(str(url), ids=wanted), load_methods(str(url)), wanted)
    for url, found in ((path / "embeddings.parquet", 6), (tmp_path / "run", 5)):  # the failed image: none
        bounded, full = load_embeddings(str(url), ids=wanted), load_embeddings(str(url))
        assert set(bounded) == {i for i in full if i in wanted} and len(bounded) == found
        for image_id, vector in bounded.items():
            np.testing.assert_array_equal(vector, full[image_id])
    # a CSV whose later block needs a wider type than its first (ints, then a float): same as a full read
    rows = 120_000  # more than the reader's first 1 MB block
    with open(path / "wide.csv", "w") as handle:
        handle.write("image_id,score\n" + "".join(f"img{k},{k}\n" for k in range(rows)) + "late,0.5\n")
    wide = {"img5", "img119999", "late"}
    _assert_same_rows(
        load_methods(str(path / "wide.csv"), ids=wide), load_methods(str(path / "wide.csv")), wide
    )
    # what a table lacks is still said, not read around
    pq.write_table(pa.table({"name": ["x"], "q": [1.0]}), path / "no_ids.parquet")
    with pytest.raises(UserError, match="needs an `image_id` column"):
        load_methods(str(path / "no_ids.parquet"), ids=wanted)
    with pytest.raises(UserError, match="no embeddings"):
        load_embeddings(str(path / "quality.parquet"), ids=wanted)


def test_bounded_evaluation_equals_the_full_read(
    dataset: dict, capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pairs over a quarter of the images: the run reads those images only, and its result (every exit,
    the fusions, the advisor, the fitted weights) is the one a full read of the tables gives."""
    import fiqa_curator.flows.evaluate as flow
    from fiqa_curator.evaluation import run

    _fake_fiqa_output(dataset, tmp_path, shards=2, embeddings=True)
    pairs = pq.read_table(dataset["path"] / "pairs.parquet").to_pylist()
    some = [p for p in pairs if p["image_id_a"] < "p10" and p["image_id_b"] < "p10"]  # 10 identities
    pq.write_table(pa.Table.from_pylist(some), tmp_path / "pairs.parquet")
    wanted = {p[side] for p in some for side in ("image_id_a", "image_id_b")}
    command = ["evaluate", "--quality", tmp_path / "run", "--pairs", tmp_path / "pairs.parquet"]
    command += ["--fmr", "1e-1", "--advise-fmr", "0.1", "--fit-fusion", "--json"]

    seen: dict[str, int] = {}

    def prepare(ids, *args):
        seen["images"] = len(ids)
        return run.prepare(ids, *args)

    monkeypatch.setattr(flow, "prepare", prepare)
    bounded = run_json(capsys, *command)
    assert seen["images"] == len(wanted - {"missing/embedding.png"}) == 50 < len(dataset["ids"])
    monkeypatch.setattr(flow, "load_methods", lambda url, options, ids: run.load_methods(url, options))
    monkeypatch.setattr(flow, "load_embeddings", lambda url, options, ids: run.load_embeddings(url, options))
    full = run_json(capsys, *command)
    assert seen["images"] == len(dataset["ids"])
    assert bounded == full and "fusion_fit" in full and "advisor" in full


@pytest.mark.s3
def test_bounded_loaders_on_s3(dataset: dict, tmp_path: Path, s3_server, s3_bucket: str) -> None:
    import s3fs

    from fiqa_curator.evaluation.run import load_embeddings, load_methods

    _fake_fiqa_output(dataset, tmp_path, shards=2, embeddings=True)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    fs.put(str(tmp_path / "run"), f"{s3_bucket}/run", recursive=True)
    pq.read_table(dataset["path"] / "quality.parquet").to_pandas().to_csv(tmp_path / "q.csv", index=False)
    fs.put(str(tmp_path / "q.csv"), f"{s3_bucket}/q.csv")
    ids = dataset["ids"]
    wanted = {ids[0], ids[101], ids[102], ids[199]}
    options = s3_server.storage_options
    for name, local in (("run", tmp_path / "run"), ("q.csv", tmp_path / "q.csv")):
        url = f"s3://{s3_bucket}/{name}"
        _assert_same_rows(load_methods(url, options, ids=wanted), load_methods(str(local)), wanted)
    bounded = load_embeddings(f"s3://{s3_bucket}/run", options, ids=wanted)
    full = load_embeddings(str(tmp_path / "run"))
    assert set(bounded) == wanted and all(np.array_equal(v, full[k]) for k, v in bounded.items())


def test_tie_warnings_list_the_most_affected_methods_and_count_the_rest() -> None:
    from fiqa_curator.flows.evaluate import TIE_LINES, tie_warnings

    boundary = [{"discard_fraction": 0.1}]
    affected = {f"m{i}": {"pairs": 10 + i, "boundaries": boundary} for i in range(TIE_LINES + 2)}
    result = {
        "pairs_used": 100,
        "methods": {name: {} for name in [*affected, "clean"]},
        "order_dependent": {"discard_limit": 0.3, "methods": affected},
    }
    lines = tie_warnings(result)
    assert f"{TIE_LINES + 2} of {TIE_LINES + 3} method(s)" in lines[0]
    assert [line.split(":")[0].strip() for line in lines[1:-1]] == [
        f"m{i}" for i in range(TIE_LINES + 1, 1, -1)
    ]
    assert lines[-1] == "  ... and 2 more method(s): `order_dependent` in the JSON result"
