"""The sample dataset (`fiqa demo-data OUT`): aligned package faces, degraded at graded severities,
with the utility target of every image, ready to score, evaluate and train on.

OUT/
  images/<face>/<face>__clean.png, <face>__<degradation>_s<severity>.png    aligned 112x112 crops
  manifest.csv       a fiqa manifest (uri, image_id, identity) plus face, split, degradation, severity,
                     utility, fr_genuine_distance, provenance, licence, alignment
  pairs.parquet      image_id_a, image_id_b, genuine: every image against every clean image but its own
  fr_embeddings.parquet   image_id, embedding: dlib's 128-d descriptors (for `fiqa evaluate --embeddings`)
  raw/               unaligned photographs for `fiqa score --align` (two portraits, a two-face collage,
                     crops with no face, a truncated file)
  SOURCES.md         provenance and licence of every source face

Everything is seeded: the same arguments give the same files on every machine.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fiqa_curator.demo_kit.degrade import DEGRADATIONS, SEVERITIES, degrade
from fiqa_curator.demo_kit.faces import SourceFace, lfw_non_faces, source_faces
from fiqa_curator.demo_kit.utility import fr_embeddings, references, utility
from fiqa_curator.schemas.errors import UserError

HELD_OUT_LFW = 14  # LFW faces held out from training, plus grace_hopper: 15 faces never seen in training
SPLIT_SEED = 20261130
MANIFEST = "manifest.csv"


def split_faces(faces: Sequence[SourceFace], seed: int = SPLIT_SEED) -> dict[str, str]:
    """face_id -> "train" or "test". The two portraits are fixed (astronaut: train, grace_hopper: test, so
    each split has a colour face); LFW faces are split by a seeded permutation."""
    lfw = [face.face_id for face in faces if face.face_id.startswith("lfw")]
    order = np.random.default_rng(seed).permutation(len(lfw))
    test = {lfw[i] for i in order[:HELD_OUT_LFW]}
    split = {face.face_id: ("test" if face.face_id in test else "train") for face in faces}
    split.update(
        {name: value for name, value in (("astronaut", "train"), ("grace_hopper", "test")) if name in split}
    )
    return split


@dataclass
class Sample:
    """Images of a set of faces with everything known about them (arrays in one order)."""

    images: np.ndarray  # (N, 112, 112, 3) uint8
    image_ids: list[str]
    face_index: np.ndarray  # index into `faces`
    degradation: list[str]
    severity: np.ndarray
    faces: list[SourceFace]


def degraded_set(
    faces: Sequence[SourceFace],
    *,
    kinds: Sequence[str] = tuple(DEGRADATIONS),
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    variants: int = 1,
) -> Sample:
    """The clean image of every face plus every (kind, severity) degradation, `variants` times each."""
    images, ids, owner, kind_of, severity_of = [], [], [], [], []
    for index, face in enumerate(faces):
        # one generator per face: adding or removing faces does not change the others' images
        rng = np.random.default_rng([seed, index])
        images.append(face.aligned)
        ids.append(f"{face.face_id}/{face.face_id}__clean.png")
        owner.append(index), kind_of.append("clean"), severity_of.append(0)
        for variant in range(variants):
            suffix = f"_v{variant}" if variants > 1 else ""
            for kind in kinds:
                for severity in severities:
                    images.append(degrade(face.aligned, kind, severity, rng))
                    ids.append(f"{face.face_id}/{face.face_id}__{kind}_s{severity}{suffix}.png")
                    owner.append(index), kind_of.append(kind), severity_of.append(severity)
    return Sample(np.stack(images), ids, np.array(owner), kind_of, np.array(severity_of), list(faces))


def utility_of(
    sample: Sample, refs: np.ndarray, face_columns: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(utility, genuine distance, embeddings) of every image of `sample`; `refs` are the references of
    the gallery faces, `face_columns` maps each of the sample's faces to its column in `refs`."""
    embeddings = fr_embeddings(sample.images)
    target = face_columns[sample.face_index]
    margin = utility(embeddings, target, refs)
    genuine = np.linalg.norm(embeddings - refs[target], axis=1)
    return margin, genuine.astype(np.float32), embeddings


def _write_raw(folder: Path) -> None:
    """Unaligned photographs for `--align`: the originals, a collage with two faces, crops with no face,
    and a truncated file (a row with status decode_error, never a crash)."""
    from fiqa_curator.demo_kit.faces import _astronaut, _grace_hopper

    folder.mkdir(parents=True, exist_ok=True)
    astronaut, grace = _astronaut()[0], _grace_hopper()[0]
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(grace).save(folder / "grace_hopper.jpg", quality=92)
    collage = np.full((620, 1100, 3), 255, np.uint8)
    collage[10:610, 10:522] = grace
    collage[40:552, 570:1082] = astronaut
    Image.fromarray(collage).save(folder / "two_faces.jpg", quality=92)
    for index, crop in enumerate(lfw_non_faces(3)):
        Image.fromarray(crop).resize((200, 200), Image.Resampling.BICUBIC).save(
            folder / f"no_face_{index}.png"
        )
    (folder / "broken_truncated.jpg").write_bytes((folder / "two_faces.jpg").read_bytes()[:300])


def build_sample_set(
    out: Path | str,
    *,
    split: str = "test",
    severities: Sequence[int] = SEVERITIES,
    kinds: Sequence[str] = tuple(DEGRADATIONS),
    max_faces: int | None = None,
    seed: int = 0,
    log=print,
) -> Path:
    """Write the sample dataset for the faces of `split` ("test": held out from the demo model's training,
    "train", or "all") under `out`; returns the manifest path."""
    out = Path(out)
    all_faces = source_faces()
    splits = split_faces(all_faces)
    chosen = [face for face in all_faces if split == "all" or splits[face.face_id] == split][:max_faces]
    if not chosen:
        raise UserError(f"no faces in split {split!r}")
    log(
        f"[demo-data] {len(chosen)} source faces ({split}), "
        f"{len(kinds)} degradations x {len(severities)} severities"
    )
    sample = degraded_set(chosen, kinds=kinds, severities=severities, seed=seed)
    # Impostors are always all 102 source faces: an image's utility does not depend on which subset is built.
    refs = references(np.stack([face.aligned for face in all_faces]))
    columns = np.array([all_faces.index(face) for face in chosen])
    log(f"[demo-data] utility of {len(sample.image_ids)} images from dlib's face-recognition model")
    margin, genuine, embeddings = utility_of(sample, refs, columns)

    images = out / "images"
    for image, image_id in zip(sample.images, sample.image_ids, strict=True):
        path = images / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    rows = []
    for i, image_id in enumerate(sample.image_ids):
        face = chosen[sample.face_index[i]]
        rows.append(
            {
                "uri": f"images/{image_id}",
                "image_id": image_id,
                "identity": face.face_id,
                "face": face.face_id,
                "split": splits[face.face_id],
                "degradation": sample.degradation[i],
                "severity": int(sample.severity[i]),
                "utility": f"{margin[i]:.6f}",
                "fr_genuine_distance": f"{genuine[i]:.6f}",
                "alignment": face.alignment,
                "provenance": face.provenance,
                "licence": face.licence,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / MANIFEST, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    clean = [i for i, kind in enumerate(sample.degradation) if kind == "clean"]
    pairs_a, pairs_b, genuine_flag = [], [], []
    for i, image_id in enumerate(sample.image_ids):
        for j in clean:
            if j != i:
                pairs_a.append(image_id)
                pairs_b.append(sample.image_ids[j])
                genuine_flag.append(bool(sample.face_index[i] == sample.face_index[j]))
    pq.write_table(
        pa.table({"image_id_a": pairs_a, "image_id_b": pairs_b, "genuine": genuine_flag}),
        out / "pairs.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "image_id": sample.image_ids,
                "embedding": pa.array(list(embeddings), type=pa.list_(pa.float32())),
            }
        ),
        out / "fr_embeddings.parquet",
    )
    _write_raw(out / "raw")
    sources = [
        "# Source faces",
        "",
        "| face | split | alignment | provenance | licence |",
        "|---|---|---|---|---|",
    ]
    sources += [
        f"| {f.face_id} | {splits[f.face_id]} | {f.alignment} | {f.provenance} | {f.licence} |"
        for f in chosen
    ]
    (out / "SOURCES.md").write_text("\n".join(sources) + "\n")
    (out / "dataset.json").write_text(
        json.dumps(
            {
                "split": split,
                "faces": len(chosen),
                "images": len(sample.image_ids),
                "kinds": list(kinds),
                "severities": list(severities),
                "seed": seed,
                "pairs": len(pairs_a),
                "genuine_pairs": int(sum(genuine_flag)),
                "utility": "identification margin in dlib's metric (demo_kit/utility.py)",
            },
            indent=1,
        )
    )
    log(f"[demo-data] wrote {len(rows)} images, {len(pairs_a)} pairs, manifest {out / MANIFEST}")
    return out / MANIFEST
