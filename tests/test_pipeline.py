"""The scoring pipeline end to end: the real Prefect flow on a real two-node Ray cluster."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from fiqa_curator.flows import execution, sources
from fiqa_curator.flows.execution import forget_block_stats
from fiqa_curator.flows.plan import PlanConflict
from fiqa_curator.flows.sources import InputError
from fiqa_curator.schemas import SCHEMA_VERSION
from fiqa_curator.schemas.layout import TARS_FILE
from fiqa_curator.workers import QualityScorer, ViTFIQA, ViTFIQAConfig, decode_face, load_model
from fiqa_curator.workers.allocator import keeps_large_buffers
from tests.conftest import TOLERANCE, ReferenceFixture, read_quality_table
from tests.reference_vitfiqa import randomize_state_dict, reference_forward

pytestmark = pytest.mark.slow


def write_pngs(images: np.ndarray, folder: Path, prefix: str = "img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, image in enumerate(images):
        name = f"{prefix}_{index:03d}.png"
        Image.fromarray(image).save(folder / name)
        names.append(name)
    return names


@pytest.mark.parametrize("exit_depth", [1, 6, 12])
def test_fixture_parity_through_the_pipeline(
    reference: ReferenceFixture, exit_depth: int, tmp_path: Path, run_score
) -> None:
    names = write_pngs(reference.images, tmp_path / "in" / "sub dir")
    summary, rows = run_score(
        tmp_path / "in",
        tmp_path / "out",
        checkpoint=str(reference.checkpoint),
        model_config=str(reference.path / "config.json"),
        exit_depth=exit_depth,
        shard_size=3,
        batch_size=4,
        fusion="final",
    )
    assert summary.counts == {"ok": len(names)} and summary.shards_written == 3
    for index, name in enumerate(names):
        row = rows[f"sub dir/{name}"]
        assert row["status"] == "ok" and row["exit_depth"] == exit_depth and not row["resized"]
        np.testing.assert_allclose(
            row["exit_scores"], reference.block_quality[index, :exit_depth], **TOLERANCE
        )
        np.testing.assert_allclose(
            row["quality"], reference.block_quality[index, exit_depth - 1], **TOLERANCE
        )
        np.testing.assert_allclose(row["quality_final"], row["quality"])
        np.testing.assert_allclose(
            row["quality_f"], reference.block_quality[index, :exit_depth].mean(), **TOLERANCE
        )
        weights = np.arange(1, exit_depth + 1) / np.arange(1, exit_depth + 1).sum()
        np.testing.assert_allclose(
            row["quality_fw"], reference.block_quality[index, :exit_depth] @ weights, **TOLERANCE
        )
        assert row["model_sha256"] == summary.model_sha256 == load_model(reference.checkpoint).sha256


def test_other_configuration_parity(tmp_path: Path, run_score) -> None:
    config = ViTFIQAConfig(mode="full", embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0)
    state = randomize_state_dict(ViTFIQA(config), seed=11)
    checkpoint = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, checkpoint)
    (tmp_path / "arch.json").write_text(json.dumps({"num_heads": 3, "note": "unknown keys are ignored"}))
    images = np.random.default_rng(3).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    names = write_pngs(images, tmp_path / "in")
    _, rows = run_score(
        tmp_path / "in",
        tmp_path / "out",
        checkpoint=str(checkpoint),
        model_config=str(tmp_path / "arch.json"),
        shard_size=2,
    )
    for exit_at in (1, 2, 3):
        _, expected = reference_forward(
            torch.from_numpy(images), state, mode="full", patch_size=9, num_heads=3, exit_at=exit_at
        )
        got = [rows[name]["exit_scores"][exit_at - 1] for name in names]
        np.testing.assert_allclose(got, expected.numpy(), **TOLERANCE)


def _tiny_checkpoint(tmp_path: Path) -> tuple[str, str]:
    config = ViTFIQAConfig(mode="token", embed_dim=32, depth=4, num_heads=4)
    torch.manual_seed(5)
    path = tmp_path / "tiny" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ViTFIQA(config).state_dict(), path)
    (path.parent / "config.json").write_text(json.dumps(config.to_dict()))
    return str(path), str(path.parent / "config.json")


def _api_scores(
    checkpoint: str, payloads: dict[str, bytes], exit_depth: int | None = None
) -> dict[str, np.ndarray]:
    scorer = QualityScorer(load_model(checkpoint), device="cpu")
    decoded = {key: decode_face(data) for key, data in payloads.items()}
    keys = [key for key, result in decoded.items() if result.ok]
    result = scorer.score(np.stack([decoded[k].image for k in keys]), exit_depth=exit_depth)
    return {key: result.exit_scores[i] for i, key in enumerate(keys)}


def _jpeg_folder(tmp_path: Path, count: int) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(count):
        (folder / f"f{index:02d}.jpg").write_bytes(_jpeg(index))
    return folder


def _jpeg(seed: int, size: int = 112) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("manifest_format", ["csv", "parquet"])
def test_manifest_input_through_the_cli(manifest_format: str, tmp_path: Path, run_cli) -> None:
    checkpoint, config = _tiny_checkpoint(tmp_path)
    data = tmp_path / "data"
    (data / "photos").mkdir(parents=True)
    payloads = {f"person{i % 2}-{i}": _jpeg(i) for i in range(5)}
    for key, payload in payloads.items():
        (data / "photos" / f"{key}.jpg").write_bytes(payload)
    rows = [{"uri": f"photos/{key}.jpg", "image_id": key, "identity": key.split("-")[0]} for key in payloads]
    rows.append({"uri": str(data / "photos" / "absent.jpg"), "image_id": "absent", "identity": "ghost"})
    manifest = tmp_path / f"manifest.{manifest_format}"
    if manifest_format == "csv":
        with open(manifest, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["uri", "image_id", "identity"])
            writer.writeheader()
            writer.writerows(rows)
        manifest.replace(data / manifest.name)
        manifest = data / manifest.name
    else:
        rows = [
            {**row, "uri": str(data / row["uri"]) if not row["uri"].startswith("/") else row["uri"]}
            for row in rows
        ]
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    code, printed = run_cli(
        "score",
        manifest,
        tmp_path / "out",
        "--checkpoint",
        checkpoint,
        "--model-config",
        config,
        "--no-progress",
    )
    assert code == 0, printed
    assert "done: 6 images (ok 5, read_error 1)" in printed
    table = read_quality_table(str(tmp_path / "out"))
    assert table["absent"]["status"] == "read_error" and "FileNotFoundError" in table["absent"]["error"]
    expected = _api_scores(checkpoint, payloads)
    for key in payloads:
        assert table[key]["identity"] == key.split("-")[0]
        np.testing.assert_allclose(table[key]["exit_scores"], expected[key], **TOLERANCE)


def test_webdataset_tar_shards_through_the_cli(tmp_path: Path, run_cli, monkeypatch) -> None:
    checkpoint, config = _tiny_checkpoint(tmp_path)
    folder = tmp_path / "wds"
    folder.mkdir()
    payloads = {}
    for shard in range(2):
        with tarfile.open(folder / f"train-{shard:04d}.tar", "w") as archive:
            for index in range(3):
                key = f"sample{shard}{index}"
                members = {f"{key}.jpg": _jpeg(shard * 10 + index), f"{key}.cls": f"id{index}".encode()}
                if (shard, index) == (1, 2):
                    members[f"{key}.png"] = members[f"{key}.jpg"]  # two images under one key
                    members[f"{key}.jpg"] = b"not really a jpeg"
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                    if name.endswith((".jpg", ".png")):
                        payloads[f"train-{shard:04d}.tar/{name}"] = data
    command = ["score", folder, tmp_path / "out", "--checkpoint", checkpoint, "--model-config", config]
    command += ["--shard-size", "4", "--no-progress"]
    code, printed = run_cli(*command)
    assert code == 0, printed
    assert "done: 7 images (decode_error 1, ok 6)" in printed and "2 shard(s)" in printed
    # the shards the plan was listed from, recorded beside it: a rerun reads neither tar again
    assert pq.read_table(tmp_path / "out" / TARS_FILE).column("tar_id").to_pylist() == [
        "train-0000.tar",
        "train-0001.tar",
    ]
    read: list[str] = []
    list_tar = sources._list_tar
    monkeypatch.setattr(sources, "_list_tar", lambda *args: read.append(args[-1]) or list_tar(*args))
    index_written = (tmp_path / "out" / TARS_FILE).stat().st_mtime_ns
    code, printed = run_cli(*command)
    assert code == 0 and "done: 7 images" in printed and read == [], printed
    assert (tmp_path / "out" / TARS_FILE).stat().st_mtime_ns == index_written  # still right: not rewritten
    rows = read_quality_table(str(tmp_path / "out"))
    assert rows["train-0000.tar/sample00"]["identity"] == "id0"
    assert rows["train-0001.tar/sample12.jpg"]["status"] == "decode_error"
    assert rows["train-0001.tar/sample12.png"]["source"].endswith("train-0001.tar#sample12.png")
    expected = _api_scores(
        checkpoint,
        {
            (k.rsplit(".", 1)[0] if not k.split("/")[1].startswith("sample12") else k): v
            for k, v in payloads.items()
        },
    )
    for image_id, scores in expected.items():
        np.testing.assert_allclose(rows[image_id]["exit_scores"], scores, **TOLERANCE)


def _bad_corpus(folder: Path) -> dict[str, str]:
    """Files with the status each must get; the tests make every one of them here."""
    folder.mkdir(parents=True)
    face = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    expected = {}

    def save(name: str, image: Image.Image, status: str = "ok", **options) -> None:
        image.save(folder / name, **options)
        expected[name] = status

    save("plain.png", Image.fromarray(face))
    save("UPPER CASE.JPG", Image.fromarray(face), format="JPEG")
    save("visage é 1.png", Image.fromarray(face))
    save("cmyk.tif", Image.fromarray(face).convert("CMYK"))
    save("grey16.png", Image.fromarray(face[..., 0].astype(np.uint16) * 257))
    save("palette.gif", Image.fromarray(face).quantize(32))
    save("rgba.png", Image.fromarray(np.dstack([face, face[..., 0]])))
    exif = Image.Exif()
    exif[0x0112] = 8
    save("rotated.jpg", Image.fromarray(face[:, :80]), exif=exif.tobytes())
    save("one_pixel.bmp", Image.new("RGB", (1, 1), (200, 10, 10)))
    save("huge.png", Image.new("L", (10000, 10000)), status="too_large")
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "decode_error"
    (folder / "text.jpg").write_text("not an image")
    expected["text.jpg"] = "decode_error"
    (folder / "truncated.png").write_bytes((folder / "plain.png").read_bytes()[:300])
    expected["truncated.png"] = "decode_error"
    save("icon.ico", Image.fromarray(face), status="unsupported_format")
    (folder / "notes.txt").write_text("not an input")  # not an image extension: not listed
    (folder / ".hidden.png").write_bytes((folder / "plain.png").read_bytes())  # hidden: not listed
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.png").write_bytes((folder / "plain.png").read_bytes())
    return expected


def test_bad_input_corpus(tmp_path: Path, run_score) -> None:
    expected = _bad_corpus(tmp_path / "in")
    summary, rows = run_score(tmp_path / "in", tmp_path / "out", max_pixels=50_000_000, shard_size=5)
    assert {image_id: row["status"] for image_id, row in rows.items()} == expected
    assert summary.total_rows == len(expected)
    assert rows["huge.png"]["width"] == 10000 and rows["huge.png"]["exit_scores"] is None
    assert rows["rotated.jpg"]["width"] == 112 and rows["rotated.jpg"]["height"] == 80  # orientation 8
    assert rows["one_pixel.bmp"]["resized"] is True
    for image_id, status in expected.items():
        row = rows[image_id]
        if status == "ok":
            assert len(row["exit_scores"]) == 12 and np.isfinite(row["quality"]) and row["error"] is None
        else:
            assert row["quality"] is None and row["error"]


def test_resume_skips_committed_shards_and_refuses_to_mix(tmp_path: Path, run_score) -> None:
    checkpoint, config = _tiny_checkpoint(tmp_path)
    folder = _jpeg_folder(tmp_path, 7)
    out = tmp_path / "out"
    first, rows = run_score(folder, out, checkpoint=checkpoint, model_config=config, shard_size=3)
    assert first.shards_written == 3 and (out / "_SUCCESS").exists()
    shards = sorted((out / "scores").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if the run had died before committing it
    (out / "_SUCCESS").unlink()
    second, rows_again = run_score(folder, out, checkpoint=checkpoint, model_config=config, shard_size=3)
    assert second.shards_written == 1 and second.shards_skipped == 2 and second.scored_now == 3
    assert {p.name: p.stat().st_mtime_ns for p in (out / "scores").iterdir() if p.name != shards[1].name} == {
        k: v for k, v in stamps.items() if k != shards[1].name
    }
    assert rows_again.keys() == rows.keys()
    for image_id in rows:
        np.testing.assert_allclose(
            rows_again[image_id]["exit_scores"], rows[image_id]["exit_scores"], rtol=1e-5, atol=1e-7
        )
    assert rows_again["f03.jpg"]["run_id"] != rows_again["f00.jpg"]["run_id"]  # recomputed vs kept
    assert json.loads((out / "_run.json").read_text())["total_rows"] == 7

    with pytest.raises(PlanConflict, match=r"scoring configuration changed.*exit_depth"):
        run_score(folder, out, checkpoint=checkpoint, model_config=config, shard_size=3, exit_depth=2)
    (folder / "new.jpg").write_bytes(_jpeg(99))
    with pytest.raises(PlanConflict, match="input listing changed"):
        run_score(folder, out, checkpoint=checkpoint, model_config=config, shard_size=3)
    third, rows_new = run_score(
        folder, out, checkpoint=checkpoint, model_config=config, shard_size=3, exit_depth=2, overwrite=True
    )
    assert third.total_rows == 8 and {row["exit_depth"] for row in rows_new.values()} == {2}


def test_pipeline_errors_before_any_work(tmp_path: Path, run_score) -> None:
    with pytest.raises(InputError, match="does not exist"):
        run_score(tmp_path / "absent", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images found"):
        run_score(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="--mode goes with --arch"):
        run_score(tmp_path / "empty", tmp_path / "out", mode="crfiqa")
    assert not (tmp_path / "out").exists()


def test_actors_on_two_nodes_match_one_node(tmp_path: Path, run_score, ray_cluster) -> None:
    """Two CPU actors are placed one per node (a STRICT_SPREAD placement group: a guarantee, not Ray's
    best-effort spreading) and give the rows one actor gives. Which actor scores which block is Ray Data's
    choice (it prefers the actor beside the block; one that starts late may get nothing), so the test
    asserts the placement and the rows, not how the blocks happened to be shared."""
    import ray

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    checkpoint, config = _tiny_checkpoint(tmp_path)
    folder = _jpeg_folder(tmp_path, 40)
    model = {"checkpoint": checkpoint, "model_config": config, "shard_size": 10}
    _, two = run_score(folder, tmp_path / "two", **model, workers=2, batch_size=4)
    stages = json.loads((tmp_path / "two" / "_run.json").read_text())["stages"]
    assert set(stages["actor_nodes"]) == nodes  # one actor on each node
    by_node = stages["rows_by_node"]
    assert set(by_node) <= nodes and sum(by_node.values()) == 40
    from ray.util.placement_group import placement_group_table

    released = {group["state"] for group in placement_group_table().values()}
    assert released <= {"REMOVED"}  # the run released its placement group
    _, one = run_score(folder, tmp_path / "one", **model, workers=1, batch_size=16)
    assert one.keys() == two.keys()
    for image_id in one:
        np.testing.assert_allclose(
            two[image_id]["exit_scores"], one[image_id]["exit_scores"], atol=1e-6, rtol=1e-6
        )


def test_cpu_actors_are_spread_strictly_while_there_are_nodes_enough(ray_cluster) -> None:
    from ray.util.placement_group import placement_group_table, remove_placement_group

    from fiqa_curator.flows.cluster import ActorPlacement, spread_cpu_actors

    assert (
        spread_cpu_actors(ActorPlacement(False, 1, 0.0, 4), nodes_with_cpu=2) is None
    )  # one actor: Ray places it
    assert (
        spread_cpu_actors(ActorPlacement(True, 2, 1.0, None), nodes_with_cpu=2) is None
    )  # GPUs place GPU actors
    for workers, strategy in ((2, "STRICT_SPREAD"), (3, "SPREAD")):
        group = spread_cpu_actors(ActorPlacement(False, workers, 0.0, 1), nodes_with_cpu=2)
        try:
            assert group.wait(60)
            table = placement_group_table(group)
            assert table["strategy"] == strategy and len(table["bundles"]) == workers
            if strategy == "STRICT_SPREAD":  # a guarantee (SPREAD is Ray's best effort: not asserted)
                assert len(set(table["bundles_to_node_id"].values())) == workers
        finally:
            remove_placement_group(group)


def test_analysts_read_the_table_with_duckdb(tmp_path: Path, run_score, monkeypatch) -> None:
    checkpoint, config = _tiny_checkpoint(tmp_path)
    folder = _jpeg_folder(tmp_path, 6)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    # Ray Data's records of every block (kept per operator until the run ends) are dropped as the batches
    # come: with none kept, every batch's block record is found and dropped, or Ray moved them elsewhere
    monkeypatch.setattr(execution, "KEPT_BLOCK_STATS", 0)
    dropped: list[int] = []  # per batch

    def counted_forget(dataset):
        dropped.append(forget_block_stats(dataset))
        return dropped[-1]

    monkeypatch.setattr(execution, "forget_block_stats", counted_forget)
    _, rows = run_score(folder, tmp_path / "out", checkpoint=checkpoint, model_config=config, shard_size=4)
    assert dropped and sum(dropped) >= len(dropped)
    con = duckdb.connect()
    glob = str(tmp_path / "out" / "scores" / "*.parquet")
    status_counts = dict(con.sql(f"select status, count(*) from '{glob}' group by status").fetchall())
    assert status_counts == {"ok": 6, "decode_error": 1}
    exit_two = dict(con.sql(f"select image_id, exit_scores[2] from '{glob}' where status = 'ok'").fetchall())
    for image_id, value in exit_two.items():
        assert value == pytest.approx(rows[image_id]["exit_scores"][1])
    worst = con.execute(
        f"select image_id from '{glob}' where status = 'ok' order by quality limit 1"
    ).fetchone()[0]
    assert (
        worst
        == min((r for r in rows.values() if r["status"] == "ok"), key=lambda r: r["quality"])["image_id"]
    )
    # the report was written at the end of the run and published as Prefect artifacts under stable keys;
    # the model is a token-mode one, so the page has the attention grid across exits
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert '<section id="attention">' in page and '<section id="galleries">' in page
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    keys = ["fiqa-report", "fiqa-status-counts"]
    with get_client(sync_client=True) as client:  # by key, newest first: the session's earlier runs made many
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)), sort=ArtifactSort.CREATED_DESC
        )
    assert set(keys) <= {a.key for a in artifacts}
    ours = [str(a.data) for a in artifacts if a.key == "fiqa-report" and str(tmp_path) in str(a.data)]
    assert ours and "decode_error" in ours[0] and "report/index.html" in ours[0]
    metadata = pq.read_schema(next((tmp_path / "out" / "scores").iterdir())).metadata
    assert metadata[b"fiqa.schema_version"] == SCHEMA_VERSION.encode()
    assert json.loads(metadata[b"fiqa.fusion_weights"]) == pytest.approx([0.1, 0.2, 0.3, 0.4])


@pytest.mark.s3
def test_s3_input_and_output_with_storage_options(
    tmp_path: Path, run_score, s3_server, s3_bucket: str
) -> None:
    import s3fs
    from prefect.client.orchestration import get_client

    checkpoint, config = _tiny_checkpoint(tmp_path)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    payloads = {f"in/p{i}/face {i}.jpg": _jpeg(40 + i) for i in range(5)}
    for key, data in payloads.items():
        fs.pipe(f"{s3_bucket}/{key}", data)
    with tarfile.open(tmp_path / "shard.tar", "w") as archive:
        info = tarfile.TarInfo("k1.jpg")
        info.size = len(payloads["in/p0/face 0.jpg"])
        archive.addfile(info, io.BytesIO(payloads["in/p0/face 0.jpg"]))
    fs.put(str(tmp_path / "shard.tar"), f"{s3_bucket}/in/shards/shard.tar")
    job = {"input": f"s3://{s3_bucket}/in", "output": f"s3://{s3_bucket}/out", "checkpoint": checkpoint}
    job.update(model_config=config, storage_options=s3_server.storage_options, shard_size=2)
    summary, rows = run_score(**job)
    assert summary.counts == {"ok": 6} and summary.output == f"s3://{s3_bucket}/out"
    assert fs.exists(f"{s3_bucket}/out/_SUCCESS") and len(fs.ls(f"{s3_bucket}/out/scores")) == 3
    assert not [p for p in fs.find(f"{s3_bucket}/out/_staging") if p.endswith(".part")]
    expected = _api_scores(checkpoint, {k.removeprefix("in/"): v for k, v in payloads.items()})
    for image_id, scores in expected.items():
        np.testing.assert_allclose(rows[image_id]["exit_scores"], scores, **TOLERANCE)
    np.testing.assert_allclose(
        rows["shards/shard.tar/k1"]["exit_scores"], expected["p0/face 0.jpg"], **TOLERANCE
    )

    # resuming against S3 skips everything; credentials never reach Prefect's records
    again, _ = run_score(**job)
    assert again.shards_skipped == 3 and again.scored_now == 0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        recorded = json.dumps([run.model_dump(mode="json") for run in runs], default=str)
        recorded += json.dumps([run.model_dump(mode="json") for run in client.read_task_runs()], default=str)
        flow_names = {flow.name for flow in client.read_flows()}
    assert "fiqa-score" in flow_names and runs
    assert s3_server.storage_options["secret"] not in recorded, recorded


def test_embeddings_are_stored_and_evaluated(
    reference: ReferenceFixture, tmp_path: Path, run_score, capsys
) -> None:
    from fiqa_curator.flows.cli import main

    names = write_pngs(reference.images, tmp_path / "in")
    with pytest.raises(ValueError, match="--embeddings needs the full depth"):
        run_score(
            tmp_path / "in",
            tmp_path / "partial",
            checkpoint=str(reference.checkpoint),
            exit_depth=6,
            embeddings=True,
        )
    _, rows = run_score(
        tmp_path / "in", tmp_path / "out", checkpoint=str(reference.checkpoint), embeddings=True, shard_size=5
    )
    for index, name in enumerate(names):
        np.testing.assert_allclose(rows[name]["embedding"], reference.embedding[index], **TOLERANCE)
    pairs = [
        (names[i], names[j], (i % 2) == (j % 2)) for i in range(len(names)) for j in range(i + 1, len(names))
    ]
    pq.write_table(
        pa.table(
            {
                "image_id_a": [p[0] for p in pairs],
                "image_id_b": [p[1] for p in pairs],
                "genuine": [p[2] for p in pairs],
            }
        ),
        tmp_path / "pairs.parquet",
    )
    assert (
        main(
            [
                "evaluate",
                "--quality",
                str(tmp_path / "out"),
                "--pairs",
                str(tmp_path / "pairs.parquet"),
                "--protocol",
                "iso",
                "--fmr",
                "0.5",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert (
        result["pairs_used"] == len(pairs)
        and "exit_12" in result["methods"]
        and "quality_fw" in result["methods"]
    )


def test_raw_photos_with_align_through_the_pipeline(
    reference: ReferenceFixture, tmp_path: Path, run_score
) -> None:
    """`--align all`: one row per face (ids ID#faceK), no_face and decode errors kept, scores equal the API's
    on the library's own aligned crops, and a rerun resumes."""
    from fiqa_curator.demo_kit.faces import _astronaut, _grace_hopper, lfw_non_faces
    from fiqa_curator.workers.align import align_faces

    grace, astronaut = _grace_hopper()[0], _astronaut()[0]
    collage = np.zeros((620, 1100, 3), np.uint8)
    collage[10:610, 10:522] = grace
    collage[40:552, 570:1082] = astronaut
    raw = tmp_path / "raw"
    raw.mkdir()
    photos = {
        "collage.png": collage,
        "grace.png": grace,
        **{f"texture_{i}.png": np.stack([t] * 3, -1) for i, t in enumerate(lfw_non_faces(3))},
    }
    for name, image in photos.items():
        Image.fromarray(image).save(raw / name)
    (raw / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    options = {
        "checkpoint": str(reference.checkpoint),
        "model_config": str(reference.path / "config.json"),
        "align": "all",
        "shard_size": 2,
        "batch_size": 2,
    }
    summary, rows = run_score(raw, tmp_path / "out", **options)
    collage_faces = align_faces(collage, all_faces=True)
    assert len(collage_faces) >= 2
    expected_ids = {
        *(f"collage.png#face{i}" for i in range(len(collage_faces))),
        "grace.png#face0",
        "broken.jpg",
        *(f"texture_{i}.png" for i in range(3)),
    }
    assert set(rows) == expected_ids
    assert summary.counts == {"ok": len(collage_faces) + 1, "no_face": 3, "decode_error": 1}
    assert all(
        rows[f"texture_{i}.png"]["faces"] == 0 and rows[f"texture_{i}.png"]["quality"] is None
        for i in range(3)
    )
    scorer = QualityScorer(
        load_model(reference.checkpoint, str(reference.path / "config.json")), device="cpu"
    )
    crops = [*(f.image for f in collage_faces), align_faces(grace)[0].image]
    ids = [*(f"collage.png#face{i}" for i in range(len(collage_faces))), "grace.png#face0"]
    expected = scorer.score(np.stack(crops))
    for index, image_id in enumerate(ids):
        row = rows[image_id]
        assert row["face_index"] == int(image_id[-1]) and row["faces"] == (
            len(collage_faces) if "collage" in image_id else 1
        )
        np.testing.assert_allclose(row["quality"], expected.quality[index], **TOLERANCE)
        assert len(row["face_box"]) == 4 and row["face_confidence"] > 0
    again, rows_again = run_score(raw, tmp_path / "out", **options)
    assert again.scored_now == 0 and rows_again.keys() == rows.keys()


def test_a_long_run_lets_the_model_process_go_and_starts_it_again_for_its_report(
    tmp_path: Path, run_score, monkeypatch
) -> None:
    """Over `KEEP_MODEL_PROCESS_IMAGES` (0 here), the model check's process is let go after planning and
    started again once scoring is over; the report still gets its attention figure from it, and nothing is
    left running. (The tests otherwise keep one process for the session: FIQA_KEEP_MODEL_CHECK.)"""
    import fiqa_curator.flows.score as score
    from fiqa_curator.flows import configuration

    monkeypatch.setattr(score, "KEEP_MODEL_PROCESS_IMAGES", 0)
    monkeypatch.delenv("FIQA_KEEP_MODEL_CHECK")
    asked: list[str] = []
    warm = configuration.warm_model_process
    monkeypatch.setattr(score, "warm_model_process", lambda *a, **k: (asked.append("warm"), warm(*a, **k)))
    checkpoint, config = _tiny_checkpoint(tmp_path)
    run_score(_jpeg_folder(tmp_path, 3), tmp_path / "out", checkpoint=checkpoint, model_config=config)
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert asked == ["warm"] and '<section id="attention">' in page
    configuration._ASKING.submit(lambda: None).result()  # every question asked has been answered
    assert not configuration._CHECKER  # it answered the report, then exited


class _BatchRows:
    """A scoring stage's stand-in (an actor, as ScoreStage is): the rows of each batch it is given."""

    def __call__(self, batch: dict) -> dict:
        return {"rows": np.array([len(batch["item_id"])])}


def test_decoded_blocks_reach_the_scoring_actor_whole(tmp_path: Path, ray_cluster) -> None:
    """The reading stage's blocks of `block_rows` decoded images arrive at the actor as they left: Ray
    Data's block shaping (target bytes per block) neither joins nor cuts them. A target a little above a
    block's bytes made it join two and cut them at 66 rows: batches of 64, 2, 64, 2 (a 2-image forward
    costs twice per image what a 64-image one does)."""
    import ray
    from ray.data import ActorPoolStrategy

    from fiqa_curator.flows.plan import make_plan, save_plan, shard_tasks
    from fiqa_curator.flows.shard_reading import read_shards
    from fiqa_curator.flows.sources import InputItem
    from fiqa_curator.flows.storage import Output
    from fiqa_curator.schemas.layout import LISTING_FILE

    rng = np.random.default_rng(0)
    names = write_pngs(rng.integers(0, 255, (300, 112, 112, 3), dtype=np.uint8), tmp_path / "in")
    items = [InputItem(name, "s", str(tmp_path / "in" / name)) for name in names]
    plan = make_plan("in", "folder", items, 300, {})  # one shard (two could join their last blocks)
    output = Output(str(tmp_path / "out"))
    save_plan(output, plan)
    with execution.decoded_block_size(64, {"decode": "cpu", "model_config": {"img_size": 112}}):
        dataset = (
            ray.data.from_items(shard_tasks(plan, [0]), override_num_blocks=1)
            .map_batches(
                read_shards,
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=0.25,
                fn_kwargs={
                    "listing": output.full_url(LISTING_FILE),
                    "key": plan.listing_fingerprint,
                    "storage_options": None,
                    "block_rows": 64,
                    "read_options": {"img_size": 112},
                },
            )
            .map_batches(_BatchRows, batch_size=64, batch_format="numpy", compute=ActorPoolStrategy(size=1))
        )
        sizes = sorted(int(row["rows"]) for row in dataset.take_all())
    assert sizes == [44, 64, 64, 64, 64]


class _HeldInHeap:
    """A scoring stage's stand-in: where a 100 MB buffer comes from on a thread of the actor other than
    its main one (Ray Data calls the model on such a thread)."""

    def __call__(self, batch: dict) -> dict:
        from tests.test_allocator import MAPPED

        namespace: dict = {}
        exec(MAPPED.replace("print(mapped[0])", ""), namespace)  # the same measurement, in this process
        return {"mapped": np.array([namespace["mapped"][0]]), "keeps": np.array([keeps_large_buffers()])}


def test_the_scoring_actors_keep_large_buffers_in_the_heap(ray_cluster) -> None:
    """The pipeline's actors start with the allocator settings (`execution.actor_runtime_env`), and a
    large buffer on the thread that runs the model comes from the heap, not from a fresh mmap."""
    import ray
    from ray.data import ActorPoolStrategy

    from tests.test_allocator import glibc_with_mallinfo2

    if not glibc_with_mallinfo2():
        pytest.skip("glibc >= 2.33 (mallinfo2) on Linux")
    assert execution.actor_runtime_env(gpus=True) is None
    rows = (
        ray.data.from_items([{"x": 0}])
        .map_batches(
            _HeldInHeap,
            batch_size=1,
            compute=ActorPoolStrategy(size=1),
            runtime_env=execution.actor_runtime_env(gpus=False),
        )
        .take_all()
    )
    assert [bool(row["keeps"]) for row in rows] == [True] and int(rows[0]["mapped"]) < 100 << 20


RAY_STOPPED_IN_THE_BACKGROUND = """
import threading

import psutil
import ray

from fiqa_curator.flows import cluster



def command(process):
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # Ray's short-lived processes may be gone by now
        return ""


def alive(process):
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


cluster.start_ray(None)
assert ray.is_initialized()
raylets = [p for p in psutil.Process().children(recursive=True) if "raylet" in command(p)]
assert raylets, "no raylet among this driver's processes"
go_on = threading.Event()
real_shutdown = ray.shutdown


def held_shutdown(*args, **kwargs):
    go_on.wait()
    real_shutdown(*args, **kwargs)


ray.shutdown = held_shutdown
cluster.stop_ray(in_background=True)  # returns while the shutdown cannot have ended
assert ray.is_initialized() and all(alive(p) for p in raylets)
go_on.set()
cluster.stop_ray()  # waits for it
assert not ray.is_initialized()
assert not any(alive(p) for p in raylets)
cluster.stop_ray()  # nothing left to do
print("ok")
"""


def test_ray_stops_in_the_background_and_a_later_stop_waits_for_it(tmp_path: Path) -> None:
    """A run's Ray is shut down on a thread while the run finalizes and writes its report (`fiqa score`'s
    end, ~1.3 s of waiting for Ray's processes); the caller's later `stop_ray` waits until it is down. In a
    process of its own: the test process is a driver of the test cluster."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", RAY_STOPPED_IN_THE_BACKGROUND],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
