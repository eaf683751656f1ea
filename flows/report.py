"""`fiqa report OUTPUT`: one self-contained HTML page about a quality table (OUTPUT/report/index.html).

Sections (each a `<section id=...>`): summary (what a data lead reads first), run, status, distribution,
agreement, size, thresholds, galleries, attention, identities, and evaluation when OUTPUT/evaluation/
holds a `fiqa evaluate --output` result. Empty tables read "none".
Plots are embedded PNGs and thumbnails embedded images: no external assets and no script, so the page
opens from disk or from object storage. Every name taken from the data is HTML-escaped.

The numbers come first (`flows.report_data.collect`); each section below only draws them.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fiqa_curator.flows.report_data import (
    MIN_IMAGES_PER_IDENTITY,
    ReportData,
    attention_grid,
    collect,
    faces_of,
    shown_ids,
)
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.layout import REPORT_PAGE, REPORT_SUMMARY

Faces = Mapping[str, "np.ndarray | None"]


# ---- HTML and figure helpers ----------------------------------------------------------------------------
def _png(figure: Any) -> str:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{value:.4f}" if np.isfinite(value) else "-"
    return "-" if value is None else str(value)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], table_id: str) -> str:
    """A table, or "none" when it has no rows (a header alone reads as a rendering error)."""
    if not rows:
        return f'<p class="none" id="{table_id}">none</p>'
    head = (
        "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>"
        if header
        else ""
    )
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f'<table id="{table_id}">{head}<tbody>{body}</tbody></table>'


def _count(n: int) -> str:
    return f"{n:,}"


def _thumbnail(face: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(face).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---- sections: each (data, faces) -> HTML, or None when it has nothing to show -----------------------------
def summary_section(data: ReportData, faces: Faces) -> str:
    """A few lines a data lead reads first: images, failures by kind, the recommended threshold and what
    it drops, the exit depth, and the evaluation advisor's answer when there is one."""
    failed = {status: n for status, n in data.counts.items() if status != "ok"}
    failures = (
        ", ".join(f"{html.escape(status)} {_count(n)}" for status, n in failed.items()) if failed else "none"
    )
    items = [
        f"<li><b>{_count(data.rows)}</b> images, <b>{_count(data.scored)}</b> scored</li>",
        f"<li>failures: {failures}</li>",
    ]
    if data.threshold is not None:
        share = data.threshold_dropped / data.scored
        unscored = data.rows - data.scored
        plus = f", plus the {_count(unscored)} that could not be scored" if unscored else ""
        items.append(
            f"<li>recommended threshold (the {data.threshold_quantile:g} quantile): quality &lt; "
            f"<b>{data.threshold:.4f}</b> drops <b>{_count(data.threshold_dropped)}</b> scored images "
            f"({share:.1%}){plus}</li>"
        )
    depth = data.run.config.get("exit_depth") or data.depth or "-"
    items.append(
        f"<li>exit depth used: <b>{html.escape(str(depth))}</b>, "
        f"fusion {html.escape(str(data.run.config.get('fusion', '-')))}</li>"
    )
    advisor = data.advisor()
    if advisor:
        items.append(
            f"<li>evaluation advisor: exit depth <b>{advisor['exit_depth']}</b> with "
            f"<b>{html.escape(str(advisor['option']))}</b></li>"
        )
    return f'<ul id="summary-list">{"".join(items)}</ul>'


def run_section(data: ReportData, faces: Faces) -> str:
    run, config = data.run, data.run.config
    rows = [
        ("model sha256", config.get("model_sha256", "-")),
        ("exit depth", config.get("exit_depth", "-")),
        ("fusion", config.get("fusion", "-")),
        ("run id", run.run_id or "-"),
        ("finished", run.finished_at or "-"),
        ("input", run.input or "-"),
        *[(f"version {k}", v) for k, v in run.versions.items()],
        *[(f"seconds {k}", v) for k, v in run.seconds.items()],
        ("images/s", run.images_per_second if run.run_id else "-"),
    ]
    return _table(None, rows, "run-table")


def status_section(data: ReportData, faces: Faces) -> str:
    return (
        _table(["status", "images"], list(data.counts.items()), "status-table")
        + "<h3>Examples of failures</h3>"
        + _table(["status", "file", "reason"], data.failures, "failure-table")
    )


def distribution_section(data: ReportData, faces: Faces) -> str | None:
    if data.quality_histogram is None:
        return None
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3))
    histogram = data.quality_histogram
    axis.stairs(histogram.counts, histogram.edges, fill=True, color="#3a6ea5")
    axis.set(xlabel="quality (fused)", ylabel="images")
    figure.tight_layout()
    plots = _img(_png(figure), "histogram of the fused quality")
    depth = len(data.exit_histograms)
    columns = min(depth, 6)
    rows = (depth + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 1.8 * rows), squeeze=False)
    for k in range(rows * columns):
        axis = axes[k // columns][k % columns]
        histogram = data.exit_histograms[k] if k < depth else None
        if histogram is not None:
            axis.stairs(histogram.counts, histogram.edges, fill=True, color="#777")
            axis.set_title(f"exit {k + 1}", fontsize=8)
            axis.tick_params(labelsize=6)
        else:
            axis.axis("off")
    # fixed margins: `tight_layout` draws the twelve axes once more to measure them (0.4 s of every report)
    figure.subplots_adjust(
        left=0.05, right=0.99, bottom=0.12 / rows, top=1 - 0.14 / rows, wspace=0.3, hspace=0.5
    )
    return plots + _img(_png(figure), "score distribution of every exit")


def agreement_section(data: ReportData, faces: Faces) -> str | None:
    if data.agreement is None:
        return None
    from matplotlib import pyplot as plt

    agreement, depth = data.agreement, data.depth
    figure, axis = plt.subplots(figsize=(5, 4))
    image = axis.imshow(agreement.spearman, vmin=-1, vmax=1, cmap="RdBu")
    labels = [f"{k + 1}" for k in range(depth)] + ["F"]
    axis.set_xticks(range(depth + 1), labels, fontsize=7)
    axis.set_yticks(range(depth + 1), labels, fontsize=7)
    figure.colorbar(image)
    basis = (
        f"<p>On a fixed sample of {_count(agreement.sampled)} of the {_count(data.scored)} scored images "
        "(the same images every run).</p>"
        if agreement.sampled < data.scored
        else ""
    )
    return (
        _img(_png(figure), "Spearman correlation of exits")
        + basis
        + _table(
            ["exit", "Spearman vs fused", f"overlap of bottom 10% ({agreement.bottom})"],
            agreement.overlap,
            "overlap-table",
        )
    )


def size_section(data: ReportData, faces: Faces) -> str | None:
    """Quality against decoded size; when every image has the same size there is nothing to plot."""
    if data.sample is None or data.pixel_range is None:
        return None
    table = _table(["", "images", "mean quality"], data.sizes, "size-table")
    smallest, largest = data.pixel_range
    if smallest == largest:
        side = round(smallest**0.5)
        return (
            f"<p>Every scored image decodes to the same size ({_count(int(smallest))} pixels"
            f"{f', {side}x{side}' if side * side == smallest else ''}): quality cannot be told apart by "
            "size here.</p>" + table
        )
    from matplotlib import pyplot as plt

    sample = data.sample
    resized = sample.resized
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.scatter(sample.pixels[~resized], sample.quality[~resized], s=6, label="not resized")
    axis.scatter(sample.pixels[resized], sample.quality[resized], s=6, label="resized")
    # a log axis only where sizes span orders of magnitude: over a narrow span its ticks are unreadable
    axis.set(xscale="log" if largest / max(smallest, 1.0) >= 10 else "linear")
    axis.set(xlabel="decoded pixels (width x height)", ylabel="quality")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return _img(_png(figure), "quality versus image size") + table


def thresholds_section(data: ReportData, faces: Faces) -> str | None:
    if not data.thresholds:
        return None
    rows = [(q, value, dropped, f"{dropped / data.scored:.1%}") for q, value, dropped in data.thresholds]
    return _table(
        ["quantile", "threshold", "images dropped (quality < threshold)", "share of scored"],
        rows,
        "threshold-table",
    ) + (
        f"<p>Images that could not be scored ({_count(data.rows - data.scored)}) are dropped in any case.</p>"
        if data.rows > data.scored
        else ""
    )


def _card(image_id: str, numbers: str, faces: Faces) -> str:
    """A thumbnail (or "no preview") captioned with its image id and `numbers`, both escaped."""
    face = faces.get(image_id)
    picture = (
        _img(_thumbnail(face), image_id) if face is not None else '<div class="missing">no preview</div>'
    )
    caption = f"{html.escape(image_id)}<br>{html.escape(numbers)}"
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def galleries_section(data: ReportData, faces: Faces) -> str | None:
    if not data.galleries:
        return None
    parts = []
    for title, shown in data.galleries:
        cards = [_card(image_id, f"{quality:.4f}", faces) for image_id, quality in shown]
        parts.append(f'<h3>{html.escape(title)}</h3><div class="gallery">{"".join(cards)}</div>')
    return "".join(parts)


def attention_section(data: ReportData, faces: Faces) -> str | None:
    """Quality-token attention over the patches at every exit, for a few images (token/full models): one
    picture, a row per image and a column per exit, each map over the part of the face the model sees."""
    grid = data.attention_grid
    maps = grid.maps() if grid is not None else None
    if grid is None or maps is None:
        return None
    picture = _attention_picture([faces[image_id] for image_id, _ in grid.shown], maps, grid.seen)
    legend = "".join(f"<li>{html.escape(f'{image_id} ({score:.3f})')}</li>" for image_id, score in grid.shown)
    return _img(picture, "quality-token attention at every exit") + f"<ol>{legend}</ol>"


ATTENTION_TILE = 96  # pixels per face in the attention picture


def _attention_picture(faces: Sequence[np.ndarray], maps: np.ndarray, seen: int) -> str:
    """The attention grid as one PNG drawn with numpy and PIL: 48 matplotlib axes took 1.5-2 s of every
    run's report (their layout and ticks), this takes milliseconds. Each map is scaled to its own range, as
    an image plot would, coloured with matplotlib's `inferno` and laid at 55% over the face."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    rows, depth = maps.shape[:2]
    tile, gap, header, margin = ATTENTION_TILE, 2, 14, 16
    canvas = Image.new("RGB", (margin + depth * (tile + gap), header + rows * (tile + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for column in range(depth):
        draw.text(
            (margin + column * (tile + gap) + tile // 2, 2), f"exit {column + 1}", fill="black", anchor="ma"
        )
    for row in range(rows):
        draw.text((2, header + row * (tile + gap) + tile // 2), f"{row + 1}", fill="black", anchor="lm")
        face = Image.fromarray(np.ascontiguousarray(faces[row][:seen, :seen])).resize(
            (tile, tile), Image.BILINEAR
        )
        for column in range(depth):
            values = maps[row, column].astype(np.float64)
            span = values.max() - values.min()
            scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
            heat = Image.fromarray((colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8))
            heat = heat.resize((tile, tile), Image.NEAREST)  # one block per patch, as the model sees them
            canvas.paste(
                Image.blend(face, heat, 0.55), (margin + column * (tile + gap), header + row * (tile + gap))
            )
    return _thumbnail(np.asarray(canvas))  # a data: URL of its PNG, as the galleries' faces


def _judged_cards(shown: Sequence[tuple[str, float | None, float | None]], faces: Faces) -> str:
    """Thumbnails with image id, quality (q) and similarity to the identity's centre (s)."""
    cards = [
        _card(image_id, f"q {_fmt(quality)} · s {_fmt(similarity)}", faces)
        for image_id, quality, similarity in shown
    ]
    return f'<div class="gallery">{"".join(cards)}</div>' if cards else "<p>none</p>"


def _side_by_side(left: tuple[str, str], right: tuple[str, str]) -> str:
    return (
        '<div class="pair">'
        + "".join(f"<div><h5>{html.escape(title)}</h5>{body}</div>" for title, body in (left, right))
        + "</div>"
    )


def identity_curation_part(data: ReportData, faces: Faces) -> str:
    """What `fiqa identities` found: figures, the identities with most outliers, the merge candidates."""
    curation = data.curation
    assert curation is not None
    summary = curation.summary
    thresholds = summary["thresholds"]
    weighting = "centres weighted by quality rank" if summary.get("weighted", True) else "unweighted centres"
    parts = [
        "<h3>Identity curation (fiqa identities)</h3>",
        f"<p>{html.escape(str(summary['embeddings']))}; {weighting}; similarities are cosine, each image "
        "against its identity's centre computed without it.</p>",
        _table(
            ["identities", "images", "outliers", "near-duplicates", "kept", "merge candidates"],
            [
                (
                    summary["identities"],
                    summary["images"],
                    summary["outliers"],
                    summary["duplicates"],
                    summary["kept"],
                    summary["merge_candidates"],
                )
            ],
            "curation-counts",
        ),
        _table(
            ["threshold", "cosine (margin: a difference of two)", "from"],
            [
                (
                    name,
                    "" if thresholds[name] is None else f"{thresholds[name]:.4f}",  # its source says "off"
                    thresholds["source"][name],
                )
                for name in ("outlier", "margin", "stranger", "duplicate", "merge")
                if name in thresholds  # results written before the rival margin have none
            ],
            "curation-thresholds",
        ),
    ]
    if curation.worst:
        parts.append("<h4>Identities with the largest share of outliers</h4>")
    for identity, usable, outliers, near, far in curation.worst:
        parts.append(f"<h5>{html.escape(identity)}: {outliers} of {usable} images are outliers</h5>")
        parts.append(
            _side_by_side(
                ("nearest the centre", _judged_cards(near, faces)),
                ("farthest from the centre", _judged_cards(far, faces)),
            )
        )
    if curation.merges:
        parts.append("<h4>Merge candidates: one person under two labels?</h4>")
    for first, second, similarity, first_images, second_images in curation.merges:
        parts.append(
            f"<h5>{html.escape(first)} and {html.escape(second)}: centres at cosine {similarity:.4f}</h5>"
        )
        parts.append(
            _side_by_side(
                (first, _judged_cards(first_images, faces)), (second, _judged_cards(second_images, faces))
            )
        )
    return "".join(parts)


def identities_section(data: ReportData, faces: Faces) -> str | None:
    identities = data.identities
    if identities is None:
        return identity_curation_part(data, faces) if data.curation is not None else None
    body = _table(
        ["identities", "images per identity (median)", "max"],
        [(identities.count, f"{identities.median_images:g}", identities.max_images)],
        "identity-summary",
    )

    def listed(title: str, total: int, header: list[str], rows: list, table_id: str) -> str:
        more = f"; the first {len(rows)} by name" if total > len(rows) else ""
        return f"<h3>{html.escape(title)} ({_count(total)}{more})</h3>" + _table(header, rows, table_id)

    body += listed(
        "Identities mostly below the threshold",
        identities.mostly_below_count,
        ["identity", "images", "below"],
        identities.mostly_below,
        "identity-below",
    )
    body += listed(
        f"Identities left with fewer than {MIN_IMAGES_PER_IDENTITY} images",
        identities.too_few_count,
        ["identity", "images", "kept"],
        identities.too_few,
        "identity-few",
    )
    if data.curation is not None:
        body += identity_curation_part(data, faces)
    return body


def evaluation_section(data: ReportData, faces: Faces) -> str | None:
    """The advisor's choice, pAUC per method and operating point, and the saved plots."""
    result = data.evaluation
    if not result:
        return None
    methods = result["methods"]
    points = list(next(iter(methods.values())))
    parts = [
        f"<p>protocol <b>{html.escape(str(result.get('protocol')))}</b>, {result.get('pairs_used', '-')} of "
        f"{result.get('pairs', '-')} pairs, pAUC up to {html.escape(str(result.get('discard_limit')))} "
        f"discarded (lower is better)</p>"
    ]
    ties = (result.get("order_dependent") or {}).get("methods") or {}
    if ties:  # erc with tied pair qualities split at a discard boundary (`fiqa evaluate` says so too)
        parts.append(
            f'<p id="order-dependent">For {len(ties)} of {len(methods)} methods the pAUC depends on the '
            "order of the pairs file: pairs of equal quality straddle a discard boundary (up to "
            f"{max(t['pairs'] for t in ties.values())} pairs; `order_dependent` in result.json).</p>"
        )
    advisor = result.get("advisor")
    if advisor:
        chosen = advisor["recommended"]
        saved = f", saving {chosen['compute_saved']:.0%} of the compute" if "compute_saved" in chosen else ""
        parts.append(
            f'<p id="advisor">Advisor ({html.escape(str(advisor["operating_point"]))}): exit depth '
            f"<b>{chosen['exit_depth']}</b> with <b>{html.escape(str(chosen['option']))}</b> (pAUC "
            f"{chosen['pauc']:.4f}; best {html.escape(str(advisor['best']['option']))} "
            f"{advisor['best']['pauc']:.4f}){saved}</p>"
        )
    for name, image in data.evaluation_images.items():
        parts.append(_img("data:image/png;base64," + base64.b64encode(image).decode(), name))
    ranked = sorted(methods.items(), key=lambda kv: kv[1][points[0]]["pauc"])
    parts.append(
        _table(
            ["method", *points],
            [(name, *(values[p]["pauc"] for p in points)) for name, values in ranked],
            "evaluation-table",
        )
    )
    return "".join(parts)


SECTIONS: list[tuple[str, str, Callable[[ReportData, Faces], str | None]]] = [
    ("summary", "Summary", summary_section),
    ("run", "Run", run_section),
    ("status", "Images by status", status_section),
    ("distribution", "Quality distribution", distribution_section),
    ("agreement", "Agreement between exits", agreement_section),
    ("size", "Quality versus image size", size_section),
    ("thresholds", "Recommended thresholds", thresholds_section),
    ("galleries", "Galleries", galleries_section),
    ("attention", "Quality-token attention across exits (lowest and highest images)", attention_section),
    ("identities", "Identities", identities_section),
    ("evaluation", "Evaluation: EDC and pAUC per exit and fusion", evaluation_section),
]

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1200px} nav a{margin-right:1rem}
table{border-collapse:collapse;margin:.5rem 0} \
td,th{border:1px solid #ccc;padding:.2rem .5rem;font-size:.85rem}
.gallery{display:flex;flex-wrap:wrap;gap:.5rem} \
figure{margin:0;width:120px;font-size:.7rem;word-break:break-all}
figure img{width:112px;height:112px} .missing{width:112px;height:112px;background:#eee}
.pair{display:flex;flex-wrap:wrap;gap:1.5rem} h5{margin:.4rem 0}
img{max-width:100%;height:auto} section{overflow-x:auto}
"""


def render(data: ReportData, faces: Faces) -> str:
    """The page: every section that has something to show, in order, with a navigation bar."""
    import matplotlib

    matplotlib.use("Agg")
    sections = [
        (section_id, title, body) for section_id, title, draw in SECTIONS if (body := draw(data, faces))
    ]
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    content = "".join(
        f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>' for sid, title, body in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fiqa-curator report</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; \
style-src 'unsafe-inline'">
<style>{STYLE}</style></head><body><h1>fiqa-curator quality report</h1>
<nav>{nav}</nav>
{content}</body></html>"""


def build_report(
    output_url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    threshold_quantile: float = 0.1,
    memory_limit: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(HTML, summary) for the quality table in OUTPUT."""
    output = Output(output_url, storage_options)
    data = collect(output, threshold_quantile=threshold_quantile, memory_limit=memory_limit)
    faces = faces_of(output, shown_ids(data), data.run, storage_options)
    data.attention_grid = attention_grid(data, faces, storage_options)
    return render(data, faces), data.summary()


def write_report(
    output_url: str, storage_options: Mapping[str, Any] | None = None, *, memory_limit: str | None = None
) -> tuple[str, dict[str, Any]]:
    page, summary = build_report(output_url, storage_options, memory_limit=memory_limit)
    output = Output(output_url, storage_options)
    output.commit_bytes(REPORT_PAGE, page.encode("utf-8"))
    output.commit_bytes(REPORT_SUMMARY, json.dumps(summary, indent=1).encode())
    return output.full_url(REPORT_PAGE), summary
