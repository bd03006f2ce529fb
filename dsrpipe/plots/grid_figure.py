"""The picture of a `dsrpipe compare` grid: top-1 against non-zero parameters, one line per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .canvas import colors, new_figure, no_data, save


def write_accuracy_vs_params(path: Path, points: Sequence[dict], title: str = "") -> Path:
    """One marker and colour per method: mean top-1 (±std) against mean non-zero parameters.

    `points`: dicts with method, sparsity, params, top1_mean, top1_std (top-1 as fractions)."""
    fig = new_figure(7.5, 5)
    ax = fig.subplots()
    ax.set_title(title or "top-1 against non-zero parameters")
    points = [p for p in points if p.get("top1_mean") is not None and p.get("params")]
    if not points:
        no_data(ax, "no completed runs")
        return save(fig, Path(path))
    markers = "osD^vP*Xh<>p"
    methods = list(dict.fromkeys(p["method"] for p in points))
    palette = colors(len(methods))
    for i, method in enumerate(methods):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["params"])
        x = np.array([p["params"] for p in mine], dtype=float)
        y = np.array([100 * p["top1_mean"] for p in mine])
        err = np.array([100 * (p.get("top1_std") or 0.0) for p in mine])
        ax.errorbar(
            x,
            y,
            yerr=err,
            fmt=markers[i % len(markers)] + "-",
            color=palette[i],
            capsize=3,
            ms=6,
            lw=1,
            label=method,
        )
        for p, xi, yi in zip(mine, x, y):
            ax.annotate(
                f"{p['sparsity']:g}",
                (xi, yi),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
                color=palette[i],
            )
    all_x = [p["params"] for p in points]
    if max(all_x) / min(all_x) >= 3:
        ax.set_xscale("log")
    ax.set_xlabel("non-zero parameters (whole model)")
    ax.set_ylabel("top-1 (%), exported ONNX model, mean ± std over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="method (labels: target sparsity)", fontsize=8, title_fontsize=8)
    return save(fig, Path(path))
