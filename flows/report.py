"""`fiqa report OUTPUT`: one self-contained HTML page about a quality table (OUTPUT/report/index.html).

Sections (each a `<section id=...>`): run, status, distribution, agreement, size, thresholds, galleries,
attention, identities, and evaluation when OUTPUT/evaluation/ holds a `fiqa evaluate --output` result. Plots are embedded PNGs and thumbnails embedded images: no external assets and no script, so
the page opens from disk or from object storage. Every name taken from the data is HTML-escaped.
Only the columns the page needs are read.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from flows.storage import Output
from schemas import exit_score_matrix

COLUMNS = ["image_id", "identity", "status", "error", "width", "height", "resized", "exit_depth", "exit_scores",
           "quality"]
QUANTILES = (0.01, 0.05, 0.1, 0.2, 0.3)
FAILURE_EXAMPLES = 5
GALLERY = 8
MIN_IMAGES_PER_IDENTITY = 2


def _png(figure: Any) -> str:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4f}" if np.isfinite(value) else "-"
    return "-" if value is None else str(value)


def load(output: Output) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows without exit scores, (N, L) exit scores with NaN rows where unscored). Only the columns the page
    shows are read (never embeddings), and the exit scores stay in numpy, not in Python lists."""
    table = pq.read_table(output.path("scores"), columns=COLUMNS, filesystem=output.fs)
    return table.drop_columns(["exit_scores"]).to_pandas(), exit_score_matrix(table)


def _face(listing: Mapping[str, tuple[str, int, int]], image_id: str,
          storage_options: Mapping[str, Any] | None, align: str | None = None) -> np.ndarray | None:
    """The 112x112 face the model saw, re-read from the source; None when it can no longer be read.
    For a run with `--align`, the photo is aligned again (the same detector, so the same crop)."""
    from workers.io import read_range
    from workers.preprocess import decode_face, decode_image

    item_id, face_index = image_id, 0
    if align == "all" and "#face" in image_id:
        item_id, _, index = image_id.rpartition("#face")
        face_index = int(index) if index.isdigit() else 0
    if item_id not in listing:
        return None
    try:
        data = read_range(*listing[item_id], storage_options, attempts=2)
        if not align:
            decoded = decode_face(data)
            return decoded.image if decoded.ok else None
        from workers.align import detect_faces, warp_to_template

        decoded = decode_image(data)
        faces = detect_faces(decoded.image) if decoded.ok else []
        return warp_to_template(decoded.image, faces[face_index].landmarks) if len(faces) > face_index else None
    except Exception:  # moved or deleted since scoring: the page shows "no preview"
        return None


def _thumbnail(face: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


ATTENTION_IMAGES = 4


def _attention_section(run: Mapping[str, Any], faces_by_id: Mapping[str, np.ndarray],
                       chosen: Sequence[tuple[str, float]], storage_options: Mapping[str, Any] | None) -> str | None:
    """Quality-token attention over the patches at every exit, for a few images (token/full models)."""
    from matplotlib import pyplot as plt

    from workers.checkpoint import load_model
    from workers.config import ViTFIQAConfig
    from workers.preprocess import normalize

    config = run.get("config", {}).get("model_config")
    checkpoint = run.get("checkpoint")
    if not config or not checkpoint or config.get("mode") == "crfiqa":
        return None
    try:
        loaded = load_model(checkpoint, ViTFIQAConfig.from_dict(config), storage_options=storage_options)
    except Exception:
        return None  # the checkpoint moved or is not readable from here: the page goes without this figure
    faces, labels = [], []
    for image_id, score in chosen:
        if faces_by_id.get(image_id) is not None:
            faces.append(faces_by_id[image_id])
            labels.append(f"{image_id} ({score:.3f})")
    if not faces:
        return None
    depth = int(run["config"].get("exit_depth", loaded.config.depth))
    maps = loaded.model.quality_token_attention(normalize(np.stack(faces)), depth).numpy()
    seen = loaded.config.grid_size * loaded.config.patch_size  # pixels the patches cover (108 of 112)
    figure, axes = plt.subplots(len(faces), depth, figsize=(1.1 * depth, 1.2 * len(faces)), squeeze=False)
    for row, face in enumerate(faces):
        for column in range(depth):
            axis = axes[row][column]
            axis.imshow(face[:seen, :seen])
            axis.imshow(maps[row, column], cmap="inferno", alpha=0.55, extent=(0, seen, seen, 0))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"exit {column + 1}", fontsize=7)
        axes[row][0].set_ylabel(f"{row + 1}", fontsize=7)
    figure.tight_layout()
    legend = "".join(f"<li>{html.escape(label)}</li>" for label in labels)
    return _img(_png(figure), "quality-token attention at every exit") + f"<ol>{legend}</ol>"


def _evaluation_section(output: Output, summary: dict[str, Any]) -> str | None:
    """OUTPUT/evaluation/ (written by `fiqa evaluate --output OUTPUT/evaluation`): the advisor's choice,
    pAUC per method and operating point, and the saved plots."""
    raw = output.read_bytes("evaluation/result.json")
    if not raw:
        return None
    result = json.loads(raw)
    methods = result.get("methods", {})
    if not methods:
        return None
    points = list(next(iter(methods.values())))
    parts = [f"<p>protocol <b>{html.escape(str(result.get('protocol')))}</b>, {result.get('pairs_used', '-')} of "
             f"{result.get('pairs', '-')} pairs, pAUC up to {html.escape(str(result.get('discard_limit')))} "
             f"discarded (lower is better)</p>"]
    advisor = result.get("advisor")
    if advisor:
        chosen = advisor["recommended"]
        saved = f", saving {chosen['compute_saved']:.0%} of the compute" if "compute_saved" in chosen else ""
        parts.append(f"<p id=\"advisor\">Advisor ({html.escape(str(advisor['operating_point']))}): exit depth "
                     f"<b>{chosen['exit_depth']}</b> with <b>{html.escape(str(chosen['option']))}</b> (pAUC "
                     f"{chosen['pauc']:.4f}; best {html.escape(str(advisor['best']['option']))} "
                     f"{advisor['best']['pauc']:.4f}){saved}</p>")
        summary["advisor"] = {"exit_depth": chosen["exit_depth"], "option": chosen["option"]}
    for name in ("edc.png", "pauc_vs_gflops.png"):
        image = output.read_bytes(f"evaluation/{name}")
        if image:
            parts.append(_img("data:image/png;base64," + base64.b64encode(image).decode(), name))
    ranked = sorted(methods.items(), key=lambda kv: kv[1][points[0]]["pauc"])
    parts.append(_table(["method", *points], [(name, *(data[p]["pauc"] for p in points)) for name, data in ranked],
                        "evaluation-table"))
    summary["evaluation"] = {"protocol": result.get("protocol"), "best": ranked[0][0]}
    return "".join(parts)


def build_report(output_url: str, storage_options: Mapping[str, Any] | None = None, *,
                 threshold_quantile: float = 0.1) -> tuple[str, dict[str, Any]]:
    """(HTML, summary) for the quality table in OUTPUT."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    output = Output(output_url, storage_options)
    if not output.list("scores"):
        raise ValueError(f"no quality table in {output_url} (expected scores/*.parquet)")
    frame, all_exits = load(output)
    run_raw = output.read_bytes("_run.json")
    run = json.loads(run_raw) if run_raw else {}
    listing_raw = output.read_bytes("_plan/listing.parquet")
    listing: dict[str, tuple[str, int, int]] = {}
    if listing_raw:
        for row in pq.read_table(io.BytesIO(listing_raw), columns=["image_id", "url", "offset", "length"]).to_pylist():
            listing[row["image_id"]] = (row["url"], row["offset"], row["length"])

    # scored rows with a finite score (a NaN from a broken checkpoint must not break every plot)
    ok_mask = (frame["status"] == "ok").to_numpy() & np.isfinite(frame["quality"].to_numpy(dtype=np.float64))
    ok = frame[ok_mask].copy()
    quality = ok["quality"].to_numpy(dtype=np.float64)
    exits = all_exits[ok_mask]
    counts = frame["status"].value_counts().sort_index()
    summary: dict[str, Any] = {"rows": len(frame), "counts": {k: int(v) for k, v in counts.items()}}
    sections: list[str] = []

    # run -------------------------------------------------------------------------------------------------
    config = run.get("config", {})
    run_rows = [("model sha256", config.get("model_sha256", "-")), ("exit depth", config.get("exit_depth", "-")),
                ("fusion", config.get("fusion", "-")), ("run id", run.get("run_id", "-")),
                ("finished", run.get("finished_at", "-")), ("input", run.get("input", "-")),
                *[(f"version {k}", v) for k, v in run.get("versions", {}).items()],
                *[(f"seconds {k}", v) for k, v in run.get("seconds", {}).items()],
                ("images/s", run.get("images_per_second", "-"))]
    sections.append(("run", "Run", _table(["", ""], run_rows, "run-table")))

    # status ----------------------------------------------------------------------------------------------
    examples = []
    for status, group in frame[frame["status"] != "ok"].groupby("status"):
        for _, row in group.head(FAILURE_EXAMPLES).iterrows():
            examples.append((status, row["image_id"], row["error"]))
    status_html = _table(["status", "images"], list(counts.items()), "status-table")
    status_html += "<h3>Examples of failures</h3>" + _table(["status", "file", "reason"], examples, "failure-table")
    sections.append(("status", "Images by status", status_html))

    # distribution ----------------------------------------------------------------------------------------
    if len(ok):
        figure, axis = plt.subplots(figsize=(6, 3))
        axis.hist(quality, bins=50, color="#3a6ea5")
        axis.set(xlabel="quality (fused)", ylabel="images")
        figure.tight_layout()
        plots = _img(_png(figure), "histogram of the fused quality")
        depth = exits.shape[1]
        columns = min(depth, 6)
        rows_count = (depth + columns - 1) // columns
        figure, axes = plt.subplots(rows_count, columns, figsize=(2.2 * columns, 1.8 * rows_count), squeeze=False)
        for k in range(rows_count * columns):
            axis = axes[k // columns][k % columns]
            if k < depth:
                axis.hist(exits[:, k], bins=30, color="#777")
                axis.set_title(f"exit {k + 1}", fontsize=8)
                axis.tick_params(labelsize=6)
            else:
                axis.axis("off")
        figure.tight_layout()
        plots += _img(_png(figure), "score distribution of every exit")
        sections.append(("distribution", "Quality distribution", plots))

        # agreement -------------------------------------------------------------------------------------
        ranks = pd.DataFrame(np.column_stack([exits, quality]),
                             columns=[f"exit {k + 1}" for k in range(depth)] + ["fused"]).rank()
        spearman = ranks.corr().to_numpy()
        figure, axis = plt.subplots(figsize=(5, 4))
        image = axis.imshow(spearman, vmin=-1, vmax=1, cmap="RdBu")
        labels = [f"{k + 1}" for k in range(depth)] + ["F"]
        axis.set_xticks(range(depth + 1), labels, fontsize=7)
        axis.set_yticks(range(depth + 1), labels, fontsize=7)
        figure.colorbar(image)
        bottom = max(1, round(0.1 * len(ok)))
        fused_bottom = set(np.argsort(quality, kind="stable")[:bottom])
        overlap = [(f"exit {k + 1}", float(spearman[k, depth]),
                    len(fused_bottom & set(np.argsort(exits[:, k], kind="stable")[:bottom])) / bottom)
                   for k in range(depth)]
        summary["bottom_overlap"] = {row[0]: row[2] for row in overlap}
        sections.append(("agreement", "Agreement between exits", _img(_png(figure), "Spearman correlation of exits")
                         + _table(["exit", "Spearman vs fused", f"overlap of bottom 10% ({bottom})"], overlap,
                                  "overlap-table")))

        # size --------------------------------------------------------------------------------------------
        pixels = (ok["width"].astype(float) * ok["height"].astype(float)).to_numpy()
        figure, axis = plt.subplots(figsize=(6, 3))
        resized = ok["resized"].fillna(False).to_numpy(dtype=bool)
        axis.scatter(pixels[~resized], quality[~resized], s=6, label="112x112")
        axis.scatter(pixels[resized], quality[resized], s=6, label="resized")
        axis.set(xscale="log", xlabel="decoded pixels", ylabel="quality")
        axis.legend(fontsize=7)
        size_rows = [("resized", int(resized.sum()), float(np.mean(quality[resized])) if resized.any() else np.nan),
                     ("not resized", int((~resized).sum()), float(np.mean(quality[~resized])) if (~resized).any() else np.nan)]
        sections.append(("size", "Quality versus image size", _img(_png(figure), "quality versus image size")
                         + _table(["", "images", "mean quality"], size_rows, "size-table")))

        # thresholds ------------------------------------------------------------------------------------
        threshold_rows = []
        summary["thresholds"] = {}
        for q in QUANTILES:
            value = float(np.quantile(quality, q))
            dropped = int(np.sum(quality < value))
            threshold_rows.append((f"{q:g}", value, dropped, f"{dropped / len(ok):.1%}"))
            summary["thresholds"][f"{q:g}"] = {"threshold": value, "dropped": dropped}
        sections.append(("thresholds", "Recommended thresholds", _table(
            ["quantile", "threshold", "images dropped (quality < threshold)", "share of scored"], threshold_rows,
            "threshold-table") + f"<p>Failed images ({len(frame) - len(ok)}) are dropped in any case.</p>"))

        # galleries -------------------------------------------------------------------------------------
        order = np.lexsort((ok["image_id"].to_numpy(), quality))
        chosen = float(np.quantile(quality, threshold_quantile))
        near = np.argsort(np.abs(quality - chosen), kind="stable")[:GALLERY]
        galleries = []
        faces: dict[str, np.ndarray | None] = {}
        for title, indices in (("Lowest quality", order[:GALLERY]), ("Highest quality", order[::-1][:GALLERY]),
                               (f"Around the {threshold_quantile:g} quantile threshold ({chosen:.4f})", near)):
            cards = []
            for index in indices:
                image_id = ok["image_id"].iloc[index]
                if image_id not in faces:
                    faces[image_id] = _face(listing, image_id, storage_options, config.get("align"))
                face = faces[image_id]
                picture = _img(_thumbnail(face), image_id) if face is not None else '<div class="missing">no preview</div>'
                cards.append(f'<figure>{picture}<figcaption>{html.escape(image_id)}<br>'
                             f"{quality[index]:.4f}</figcaption></figure>")
            galleries.append(f'<h3>{html.escape(title)}</h3><div class="gallery">{"".join(cards)}</div>')
        sections.append(("galleries", "Galleries", "".join(galleries)))

        picks = [*order[: ATTENTION_IMAGES // 2], *order[::-1][: ATTENTION_IMAGES // 2]]
        attention = _attention_section(run, faces, [(ok["image_id"].iloc[i], float(quality[i])) for i in picks],
                                       storage_options)
        if attention:
            sections.append(("attention", "Quality-token attention across exits (lowest and highest images)",
                             attention))

        # identities ------------------------------------------------------------------------------------
        if "identity" in ok and ok["identity"].notna().any():
            scored = ok[ok["identity"].notna()].assign(below=quality[ok["identity"].notna().to_numpy()] < chosen)
            per = scored.groupby("identity").agg(images=("image_id", "size"), below=("below", "sum"))
            per["kept"] = per["images"] - per["below"]
            mostly_below = per[per["below"] > per["images"] / 2].sort_index()
            too_few = per[per["kept"] < MIN_IMAGES_PER_IDENTITY].sort_index()
            summary["identities"] = {"count": len(per), "mostly_below": mostly_below.index.tolist(),
                                     "too_few_after_curation": too_few.index.tolist()}
            body = _table(["identities", "images per identity (median)", "max"],
                          [(len(per), float(per["images"].median()), int(per["images"].max()))], "identity-summary")
            body += f"<h3>Identities mostly below the threshold ({len(mostly_below)})</h3>" + _table(
                ["identity", "images", "below"], list(mostly_below[["images", "below"]].itertuples()), "identity-below")
            body += f"<h3>Identities left with fewer than {MIN_IMAGES_PER_IDENTITY} images ({len(too_few)})</h3>" + _table(
                ["identity", "images", "kept"], list(too_few[["images", "kept"]].itertuples()), "identity-few")
            sections.append(("identities", "Identities", body))

    evaluation = _evaluation_section(output, summary)
    if evaluation:
        sections.append(("evaluation", "Evaluation: EDC and pAUC per exit and fusion", evaluation))

    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    content = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'
                      for sid, title, body in sections)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fiqa-curator report</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1200px}} nav a{{margin-right:1rem}}
table{{border-collapse:collapse;margin:.5rem 0}} td,th{{border:1px solid #ccc;padding:.2rem .5rem;font-size:.85rem}}
.gallery{{display:flex;flex-wrap:wrap;gap:.5rem}} figure{{margin:0;width:120px;font-size:.7rem;word-break:break-all}}
figure img{{width:112px;height:112px}} .missing{{width:112px;height:112px;background:#eee}}
</style></head><body><h1>fiqa-curator quality report</h1>
<p>{len(frame)} images: {html.escape(", ".join(f"{k} {v}" for k, v in counts.items()))}</p><nav>{nav}</nav>
{content}</body></html>"""
    return page, summary


def write_report(output_url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    page, summary = build_report(output_url, storage_options)
    output = Output(output_url, storage_options)
    output.commit_bytes("report/index.html", page.encode("utf-8"))
    output.commit_bytes("report/summary.json", json.dumps(summary, indent=1).encode())
    return output.full_url("report/index.html"), summary
