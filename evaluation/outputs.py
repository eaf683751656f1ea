"""Writing an evaluation: `result.json`, `curves.parquet` (one row per method, operating point and curve
point), `summary.parquet` (one row per method and operating point), and PNG plots: the EDC curves, one
panel per operating point, and pAUC against GFLOPs per exit when the model config is known."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PLOTTED_METHODS = 8  # the best few per panel, plus every exit on the cost plot: legible at a glance


def _tables(result: Mapping[str, Any]) -> tuple[pa.Table, pa.Table]:
    curve_rows, summary_rows = [], []
    for method, points in result["methods"].items():
        for point, data in points.items():
            summary_rows.append(
                {
                    "method": method,
                    "operating_point": point,
                    "pauc": data["pauc"],
                    **{k: v for k, v in data.items() if k.startswith("pauc")},
                }
            )
            for x, y in zip(data["discard_fractions"], data["fnmr"], strict=True):
                curve_rows.append(
                    {"method": method, "operating_point": point, "discard_fraction": x, "fnmr": y}
                )
    return pa.Table.from_pylist(curve_rows), pa.Table.from_pylist(summary_rows)


def _plots(result: Mapping[str, Any], gflops_at: Callable[[int], float] | None) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = list(next(iter(result["methods"].values())))
    figure, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4), squeeze=False)
    for axis, point in zip(axes[0], points, strict=True):
        ranked = sorted(result["methods"].items(), key=lambda kv: kv[1][point]["pauc"])[:PLOTTED_METHODS]
        for method, data in ranked:
            step = "post" if result["protocol"] == "iso" else None
            x, y = data[point]["discard_fractions"], data[point]["fnmr"]
            if step:
                axis.step(x, y, where=step, label=f"{method} ({data[point]['pauc']:.4f})")
            else:
                axis.plot(x, y, label=f"{method} ({data[point]['pauc']:.4f})")
        axis.axvline(result["discard_limit"], color="grey", linestyle=":", linewidth=1)
        axis.set(
            title=f"{result['protocol']} EDC, {point}",
            xlabel="discarded fraction",
            ylabel="FNMR",
            xlim=(0, 1 if result["protocol"] == "iso" else 0.95),
        )
        axis.legend(fontsize=7)
    figure.tight_layout()
    out = {"edc.png": _png(figure, plt)}
    exits = sorted((int(m.split("_")[1]), m) for m in result["methods"] if m.startswith("exit_"))
    if exits and gflops_at is not None:
        figure, axis = plt.subplots(figsize=(5, 4))
        for point in points:
            axis.plot(
                [gflops_at(d) for d, _ in exits],
                [result["methods"][m][point]["pauc"] for _, m in exits],
                marker="o",
                label=point,
            )
        axis.set(
            title="pAUC per exit against compute", xlabel="GFLOPs per image", ylabel="pAUC (lower is better)"
        )
        axis.legend(fontsize=8)
        figure.tight_layout()
        out["pauc_vs_gflops.png"] = _png(figure, plt)
    return out


def _png(figure: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_evaluation(
    result: Mapping[str, Any],
    write: Callable[[str, bytes], None],
    gflops_at: Callable[[int], float] | None = None,
) -> list[str]:
    """Write every output through `write(name, bytes)` (an OUTPUT commit, or a plain file); returns names."""
    curves, summary = _tables(result)
    files = {"result.json": json.dumps(result, indent=1).encode()}
    for name, table in (("curves.parquet", curves), ("summary.parquet", summary)):
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        files[name] = buffer.getvalue()
    files.update(_plots(result, gflops_at))
    if "fusion_fit" in result:  # what `fiqa score --fusion` needs, on its own
        files["fusion_weights.json"] = json.dumps(result["fusion_fit"], indent=1).encode()
    for name, data in files.items():
        write(name, data)
    return sorted(files)
