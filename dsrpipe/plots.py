"""Pictures of a run, beside its report.json, and of a `dsrpipe compare` grid.

  curves.png             train/test loss and top-1 per epoch; fine-tuning continues the x axis
  density_over_time.png  density of each sparse layer per epoch (how DSR moves parameters between
                         layers), the adaptive threshold H with the weights pruned per epoch, and
                         the share of pruned weights that had been grown at the reallocation before
  layer_density.png      final density per layer, read off the exported weights
  report.md              the report's key numbers and the three pictures

Figures are drawn on `matplotlib.figure.Figure` with the Agg renderer and never through pyplot,
so no global matplotlib state (backend, open figures) changes under a caller. Every file is
written atomically: a reader sees the old file or the new one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from . import files
from .report import Report

RUN_PLOTS = ("curves.png", "density_over_time.png", "layer_density.png")
RUN_FILES = RUN_PLOTS + ("report.md",)  # report.md is written last: it existing means all exist

_DPI = 110
_TRAIN, _TEST, _FINETUNE = "tab:blue", "tab:orange", "0.92"
# The density heat map prints each cell's number ("12.3%" at 7 pt, up to 0.37 in for "100.0%")
# where the number fits: this much width per number, room to stand clear of the next included.
_CELL_NUMBER_WIDTH = 0.4  # inches
_CELL_NUMBER_HEIGHT = 0.12  # inches: a row lower than this gets no numbers
_MAX_CELL_NUMBERS = 300  # more would be a wall of digits: the colours say it


def write_run_plots(
    run_dir: Path, history_train: list[dict], history_finetune: list[dict], report: Report
) -> list[Path]:
    """Write the three PNGs and report.md into `run_dir` (beside report.json); returns their paths."""
    run_dir = Path(run_dir)
    history = list(history_train) + list(history_finetune)
    num_train = len(history_train)
    written = [
        _save(_curves(history, num_train, report), run_dir / "curves.png"),
        _save(_density_over_time(history, num_train, report), run_dir / "density_over_time.png"),
        _save(_layer_density(report), run_dir / "layer_density.png"),
    ]
    files.write_text(run_dir / "report.md", run_markdown(report, num_train, len(history_finetune)))
    return written + [run_dir / "report.md"]


# -- run pictures ----------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(figure, path: Path) -> Path:
    # The temporary file ends in .tmp, so the format is named rather than guessed from the suffix.
    with files.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)
    return path


def _mark_finetune(ax, num_train: int, total: int, label: bool) -> None:
    if total > num_train:
        ax.axvspan(
            num_train + 0.5,
            total + 0.5,
            color=_FINETUNE,
            zorder=0,
            label="fine-tuning (masks frozen)" if label else None,
        )


def _no_data(ax, message: str, *, epochs: bool = False) -> None:
    """`message` in place of a plot; `epochs`: the epoch axis stays, shared with a plot beside."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    if not epochs:
        ax.set_xticks([])
    ax.set_yticks([])


def _epoch_axis(ax, total: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0.5, total + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _curves(history: list[dict], num_train: int, report: Report):
    fig = _figure(11, 4)
    loss_ax, top1_ax = fig.subplots(1, 2)
    total = len(history)
    fig.suptitle(f"{report.name}: {report.method} on {report.dataset}")
    if not history:
        for ax in (loss_ax, top1_ax):
            _no_data(ax, "no epochs trained")
        return fig
    epochs = range(1, total + 1)
    for ax, key, title in ((loss_ax, "loss", "cross-entropy loss"), (top1_ax, "top1", "top-1 accuracy")):
        _mark_finetune(ax, num_train, total, label=ax is top1_ax)
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", ms=3, color=_TRAIN, label="train")
        ax.plot(epochs, [h[f"test_{key}"] for h in history], "o-", ms=3, color=_TEST, label="test")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        _epoch_axis(ax, total)
        ax.grid(alpha=0.3)
    if report.onnx_top1 is not None:
        top1_ax.axhline(
            report.onnx_top1,
            color="tab:green",
            ls="--",
            lw=1,
            label=f"exported ONNX: {report.onnx_top1:.2%}",
        )
    top1_ax.legend(loc="lower right", fontsize=8)
    return fig


def _density_over_time(history: list[dict], num_train: int, report: Report):
    layers = _layer_names(history, report)
    heat_height = min(9.0, max(2.2, 0.28 * len(layers) + 1.2))
    removing = any(h.get("channels_alive") for h in history)
    fig = _figure(11, heat_height + 4.2 + 2.2 * removing)
    heights = [heat_height, 2.2, 1.6] + [2.2] * removing
    heat_ax, h_ax, share_ax, *channels_ax = fig.subplots(len(heights), 1, sharex=True, height_ratios=heights)
    total = len(history)
    fig.suptitle(f"{report.name}: density of each sparse layer per epoch ({report.method})")
    if not history or not layers:
        _no_data(heat_ax, "no epochs trained" if not history else "no sparse layers")
        _no_data(h_ax, "")
        _no_data(share_ax, "")
        return fig

    import numpy as np

    grid = np.array(
        [[h.get("layer_density", {}).get(n, np.nan) for h in history] for n in layers], dtype=float
    )
    image = heat_ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0.0,
        vmax=max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, 1e-6),
        extent=(0.5, total + 0.5, len(layers) - 0.5, -0.5),
    )
    fig.colorbar(image, ax=heat_ax, label="density (non-zero fraction)", pad=0.01)
    step = max(1, math.ceil(len(layers) / 40))  # keep the labels readable on deep models
    shown = [layers[i] for i in range(0, len(layers), step)]
    fontsize = 8 if len(layers) <= 20 else 6
    heat_ax.set_yticks(range(0, len(layers), step), shown, fontsize=fontsize)
    # The heat map's width, estimated (a layout pass to measure it costs more than the whole
    # figure): the figure's, less the layer names (0.6 em a character), the colour bar and margins.
    heat_width = max(1.0, fig.get_figwidth() - 1.8 - max(map(len, shown)) * 0.6 * fontsize / 72)
    columns = _numbered_columns(total, heat_width)
    if (
        heat_height * 0.8 / len(layers) >= _CELL_NUMBER_HEIGHT
        and len(layers) * len(columns) <= _MAX_CELL_NUMBERS
    ):
        top = image.norm.vmax
        for row in range(len(layers)):
            for col in columns:
                value = grid[row, col]
                if np.isfinite(value):
                    heat_ax.text(
                        col + 1,
                        row,
                        f"{value:.1%}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if value > 0.6 * top else "white",
                    )
    heat_ax.set_ylabel("layer")
    if total > num_train:
        heat_ax.axvline(num_train + 0.5, color="white", lw=1.5, ls="--")
        heat_ax.text(num_train + 0.6, -0.45, " fine-tuning →", color="white", va="top", fontsize=8)

    epochs = np.arange(1, total + 1)
    thresholds = [h.get("threshold") for h in history]
    pruned = [h.get("pruned") or 0 for h in history]
    _mark_finetune(h_ax, num_train, total, label=False)
    drawn, bars = False, None
    if any(pruned):
        bars = h_ax.twinx()
        bars.bar(epochs, pruned, width=0.8, color="tab:gray", alpha=0.35, label="weights pruned per epoch")
        bars.set_ylabel("pruned", color="tab:gray")
        h_ax.set_zorder(bars.get_zorder() + 1)  # the H line in front of the bars
        h_ax.patch.set_visible(False)
        drawn = True
    if any(t is not None for t in thresholds):
        values = np.array([np.nan if t is None else t for t in thresholds], dtype=float)
        h_ax.plot(epochs, values, "o-", ms=3, color="tab:red", label="threshold H (end of epoch)")
        if np.nanmin(values) > 0:
            h_ax.set_yscale("log")
        h_ax.set_ylabel("H", color="tab:red")
        drawn = True
    if drawn:  # one legend, on the front axes, for the H line and the bars behind
        handles = h_ax.get_legend_handles_labels()[0] + (bars.get_legend_handles_labels()[0] if bars else [])
        h_ax.legend(handles=handles, loc="upper left", fontsize=8)
    else:
        _no_data(h_ax, f"no threshold and nothing pruned (method '{report.method}')", epochs=True)
    _epoch_axis(h_ax, total)
    h_ax.grid(alpha=0.3)
    _regrowth_share(share_ax, history, num_train, report)
    if removing:
        _channels_alive(channels_ax[0], history, num_train)
    return fig


def _numbered_columns(total: int, width: float) -> list[int]:
    """The epochs (0-based columns of a heat map `width` inches wide) whose cells get their
    number: all where numbers fit, else every 2nd or 3rd (epochs 2, 4, ... or 3, 6, ...) that is
    far enough from the edges for its number to stay inside the map; none where a cell is
    narrower than a third of a number (past about 65 epochs), whose number would then stand over
    cells that are not its own."""
    cell = width / max(total, 1)
    step = max(1, math.ceil(_CELL_NUMBER_WIDTH / cell))
    if step > 3:
        return []
    half = _CELL_NUMBER_WIDTH / 2
    return [c for c in range(step - 1, total, step) if half <= (c + 0.5) * cell <= width - half]


def _channels_alive(ax, history: list[dict], num_train: int) -> None:
    """Channel removal: the live channels of each channel group, per epoch."""
    import numpy as np

    groups = list(next(h["channels_alive"] for h in history if h.get("channels_alive")))
    epochs = np.arange(1, len(history) + 1)
    for group, color in zip(groups, _colors(len(groups))):
        alive = [(h.get("channels_alive") or {}).get(group, np.nan) for h in history]
        ax.plot(epochs, alive, "o-", ms=2.5, lw=1.2, color=color, label=group)
    _mark_finetune(ax, num_train, len(history), label=False)
    ax.set_ylabel("channels alive")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=6, ncol=max(1, math.ceil(len(groups) / 6)))
    if any(h.get("shrinks") for h in history):  # the model was cut smaller as it trained
        macs = ax.twinx()
        macs.plot(epochs, [h.get("macs", np.nan) for h in history], "k--", lw=1, label="MACs per sample")
        for epoch, h in enumerate(history, start=1):
            if h.get("shrinks"):
                macs.axvline(epoch, color="0.75", lw=0.8, zorder=0)
        macs.set_ylabel("MACs per sample\n(grey: epochs that shrank)", fontsize=8)
        macs.set_ylim(bottom=0)
        macs.legend(loc="lower left", fontsize=6)
    ax.grid(alpha=0.3)
    _epoch_axis(ax, len(history))


def _regrowth_share(ax, history: list[dict], num_train: int, report: Report) -> None:
    """Per epoch, of the weights reallocation switched off, the share it had grown at the
    reallocation just before: near 1 means it mostly prunes the zeros it has just grown (churn),
    low means the grown weights survive and the structure explores."""
    import numpy as np

    total = len(history)
    shares = [h.get("pruned_grown_share") for h in history]
    _mark_finetune(ax, num_train, total, label=False)
    if any(v is not None for v in shares):
        values = 100 * np.array([np.nan if v is None else v for v in shares], dtype=float)
        ax.plot(
            np.arange(1, total + 1),
            values,
            "o-",
            ms=3,
            color="tab:purple",
            label="pruned weights grown at the reallocation before (%)",
        )
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of pruned", color="tab:purple")
        ax.legend(loc="upper left", fontsize=8)
    else:
        _no_data(ax, f"no regrowth to measure (method '{report.method}')", epochs=True)
    ax.set_xlabel("epoch")
    _epoch_axis(ax, total)
    ax.grid(alpha=0.3)


def _layer_names(history: list[dict], report: Report) -> list[str]:
    """Layers in model order, as the first epoch (or the report) lists them."""
    names: dict[str, None] = {}
    for source in [h.get("layer_density", {}) for h in history] + [report.layer_density]:
        names.update(dict.fromkeys(source))
    return list(names)


def _layer_density(report: Report):
    density = report.layer_density
    fig = _figure(max(6.0, min(16.0, 2.5 + 0.35 * len(density))), 4.2)
    ax = fig.subplots()
    ax.set_title(f"{report.name}: final density per sparse layer")
    if not density:
        _no_data(ax, "no sparse layers")
        return fig
    names, values = list(density), list(density.values())
    positions = range(len(names))
    ax.bar(positions, values, color="tab:blue")
    if len(names) <= 24:
        for x, v in zip(positions, values):
            ax.text(x, v, f"{v:.1%}", ha="center", va="bottom", fontsize=7)
    sparsity = report.sparsity
    if sparsity is not None:
        ax.axhline(
            1 - sparsity,
            color="tab:red",
            ls="--",
            lw=1.2,
            label=f"overall: {1 - sparsity:.1%} dense = {sparsity:.1%} sparse",
        )
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(
        list(positions),
        names,
        rotation=45 if len(names) > 6 else 0,
        ha="right" if len(names) > 6 else "center",
        fontsize=8 if len(names) <= 30 else 6,
    )
    ax.set_ylabel("density (non-zero fraction)")
    ax.set_ylim(0, min(1.1, max(values) * 1.2) or 1.0)
    ax.grid(axis="y", alpha=0.3)
    return fig


# -- report.md --------------------------------------------------------------------------------
def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}%}"


def _cpu_line(report: Report) -> str:
    """One line, e.g. AMD EPYC, x86_64; avx2 avx512_vnni, no amx_int8; onnxruntime 1.32.0 (CPU...)."""
    cpu, runtime = report.cpu, report.onnxruntime or {}
    flags = cpu.get("flags")
    if flags is None:
        features = "flags unknown"
    else:
        have = [f for f, present in flags.items() if present]
        lack = [f for f, present in flags.items() if not present]
        features = " ".join(have) or "none of " + " ".join(flags)
        features += f", no {' '.join(lack)}" if have and lack else ""
    providers = ", ".join(runtime.get("providers") or [])
    return (
        f"{cpu.get('model_name') or 'unknown'}, {cpu.get('machine') or '?'}; {features}; "
        f"onnxruntime {runtime.get('version', '?')} ({providers})"
    )


def _training_line(training: dict) -> str:
    """Wall time, MAC-weighted cost and peak memory of training, in one cell."""
    parts = [f"{training['train_seconds']:.1f} s of training steps"]
    if training.get("mac_images"):
        parts.append(f"{training['mac_images']:.3g} forward MACs × images")
    if training.get("peak_rss_bytes"):
        parts.append(f"peak RSS {training['peak_rss_bytes'] / 2**20:,.0f} MiB")
    if training.get("peak_cuda_bytes"):
        parts.append(f"peak CUDA {training['peak_cuda_bytes'] / 2**20:,.0f} MiB")
    return "; ".join(parts)


def _shrinks_line(shrinks: list[dict]) -> str:
    first, last = shrinks[0], shrinks[-1]
    return (
        f"{len(shrinks)} time(s), iterations {first['iteration']}–{last['iteration']}: "
        f"{first['macs_before']:,} → {last['macs_after']:,} ({last['macs_after'] / first['macs_before']:.2f}×)"
    )


def run_markdown(report: Report, train_epochs: int, finetune_epochs: int) -> str:
    latency = report.latency_ms or {}
    size = report.onnx_bytes
    target = report.target_sparsity
    max_diff = report.max_abs_logit_diff
    rows = [
        ("method", f"`{report.method}`"),
        ("sparsity (measured / target)", f"{_pct(report.sparsity)} / {_pct(target, 1)}"),
        (
            "parameters (non-zero / total)",
            f"{report.nonzero_params:,} / {report.total_params:,}",
        ),
        ("top-1, torch", _pct(report.torch_top1)),
        ("top-1, ONNX", _pct(report.onnx_top1)),
        ("top-1 agreement, ONNX vs torch", _pct(report.top1_agreement)),
        ("max \\|Δlogit\\|", "n/a" if max_diff is None else f"{max_diff:.2e}"),
        (
            "latency p50 / p95 (batch 1, onnxruntime CPU)",
            f"{latency['p50']:.3f} / {latency['p95']:.3f} ms" if latency else "n/a",
        ),
        ("ONNX file size", "n/a" if size is None else f"{size:,} bytes ({size / 1024:.1f} KiB)"),
        *(
            [
                (
                    "vs the dense model (bytes; p50 speed; batch-64 throughput)",
                    f"{report.size_ratio:.3f}×; {report.speedup['latency_p50']:.2f}×; "
                    f"{report.speedup['throughput']:.2f}×",
                )
            ]
            if report.speedup is not None
            else []
        ),
        *(
            [
                (
                    f"int8 ({report.int8_range or 'full'} range): top-1 float32 ONNX / agreement with it",
                    f"{_pct(report.fp32_onnx_top1)} / {_pct(report.int8_agreement)}",
                )
            ]
            if report.int8_agreement is not None
            else []
        ),
        *([("CPU (onnxruntime)", _cpu_line(report))] if report.cpu is not None else []),
        ("epochs (train + fine-tune)", f"{train_epochs} + {finetune_epochs}"),
        *([("training cost", _training_line(report.training))] if report.training else []),
        *(
            [("shrunk while training (MACs per sample)", _shrinks_line(report.training["shrinks"]))]
            if (report.training or {}).get("shrinks")
            else []
        ),
    ]
    status = "**Validation passed.**" if report.passed else f"**Validation FAILED:** {report.failure}"
    warnings = (report.training or {}).get("warnings") or []
    lines = [
        f"# {report.name}: {report.method} on {report.dataset} ({report.model})",
        "",
        status,
        "",
        *[f"**Warning:** {line}\n" for line in warnings],
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in rows],
        "",
        "## Training curves",
        "",
        "![Loss and top-1 per epoch](curves.png)",
        "",
        "## Density over time",
        "",
        "![Density of each sparse layer per epoch, threshold H, weights pruned, and the share of pruned weights "
        "grown at the reallocation before](density_over_time.png)",
        "",
        "## Final density per layer",
        "",
        "![Final density per sparse layer](layer_density.png)",
        "",
        f"Numbers from `report.json`, written by dsrpipe {report.dsrpipe_version or ''} "
        f"at {report.created or ''}.",
        "",
    ]
    return "\n".join(lines)


# -- a compare grid ---------------------------------------------------------------------------
def write_accuracy_vs_params(path: Path, points: Sequence[dict], title: str = "") -> Path:
    """One marker and colour per method: mean top-1 (±std) against mean non-zero parameters.

    `points`: dicts with method, sparsity, params, top1_mean, top1_std (top-1 as fractions)."""
    import numpy as np

    fig = _figure(7.5, 5)
    ax = fig.subplots()
    ax.set_title(title or "top-1 against non-zero parameters")
    points = [p for p in points if p.get("top1_mean") is not None and p.get("params")]
    if not points:
        _no_data(ax, "no completed runs")
        return _save(fig, Path(path))
    markers = "osD^vP*Xh<>p"
    methods = list(dict.fromkeys(p["method"] for p in points))
    colors = _colors(len(methods))
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
            color=colors[i],
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
                color=colors[i],
            )
    all_x = [p["params"] for p in points]
    if max(all_x) / min(all_x) >= 3:
        ax.set_xscale("log")
    ax.set_xlabel("non-zero parameters (whole model)")
    ax.set_ylabel("top-1 (%), exported ONNX model, mean ± std over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="method (labels: target sparsity)", fontsize=8, title_fontsize=8)
    return _save(fig, Path(path))


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
