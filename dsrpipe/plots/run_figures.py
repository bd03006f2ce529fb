"""The three pictures of a run, drawn from its epochs' records (metrics.jsonl) and report.json:
the training curves, the density of each sparse layer over time, the final density per layer."""

from __future__ import annotations

import math

import numpy as np

from ..report import Report
from .canvas import TEST, TRAIN, colors, epoch_axis, mark_finetune, new_figure, no_data

# The density heat map prints each cell's number ("12.3%" at 7 pt, up to 0.37 in for "100.0%")
# where the number fits: this much width per number, room to stand clear of the next included.
_CELL_NUMBER_WIDTH = 0.4  # inches
_CELL_NUMBER_HEIGHT = 0.12  # inches: a row lower than this gets no numbers
_MAX_CELL_NUMBERS = 300  # more would be a wall of digits: the colours say it


# -- curves.png ------------------------------------------------------------------------------
def curves(history: list[dict], num_train: int, report: Report):
    """Train and test loss and top-1 per epoch, fine-tuning shaded, the exported model's top-1."""
    fig = new_figure(11, 4)
    loss_ax, top1_ax = fig.subplots(1, 2)
    total = len(history)
    fig.suptitle(f"{report.name}: {report.method} on {report.dataset}")
    if not history:
        for ax in (loss_ax, top1_ax):
            no_data(ax, "no epochs trained")
        return fig
    epochs = range(1, total + 1)
    for ax, key, title in ((loss_ax, "loss", "cross-entropy loss"), (top1_ax, "top1", "top-1 accuracy")):
        mark_finetune(ax, num_train, total, label=ax is top1_ax)
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", ms=3, color=TRAIN, label="train")
        ax.plot(epochs, [h[f"test_{key}"] for h in history], "o-", ms=3, color=TEST, label="test")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        epoch_axis(ax, total)
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


# -- density_over_time.png -------------------------------------------------------------------
def density_over_time(history: list[dict], num_train: int, report: Report):
    """One panel under another, epoch by epoch: the density of each sparse layer (a heat map), the
    threshold H and the weights pruned, the share of pruned weights that had just been grown, and,
    with channel removal, the live channels."""
    layers = layer_names(history, report)
    removing = any(h.get("channels_alive") for h in history)
    heat_height = min(9.0, max(2.2, 0.28 * len(layers) + 1.2))
    fig = new_figure(11, heat_height + 4.2 + 2.2 * removing)
    heights = [heat_height, 2.2, 1.6] + [2.2] * removing
    heat_ax, h_ax, share_ax, *channels_ax = fig.subplots(len(heights), 1, sharex=True, height_ratios=heights)
    fig.suptitle(f"{report.name}: density of each sparse layer per epoch ({report.method})")
    if not history or not layers:
        no_data(heat_ax, "no epochs trained" if not history else "no sparse layers")
        no_data(h_ax, "")
        no_data(share_ax, "")
        return fig
    _density_heat_map(fig, heat_ax, heat_height, history, layers, num_train)
    _threshold_and_pruned(h_ax, history, num_train, report)
    _regrowth_share(share_ax, history, num_train, report)
    if removing:
        _channels_alive(channels_ax[0], history, num_train)
    return fig


def layer_names(history: list[dict], report: Report) -> list[str]:
    """Layers in model order, as the first epoch (or the report) lists them."""
    names: dict[str, None] = {}
    for source in [h.get("layer_density", {}) for h in history] + [report.layer_density]:
        names.update(dict.fromkeys(source))
    return list(names)


def _density_heat_map(fig, ax, height: float, history: list[dict], layers: list[str], num_train: int) -> None:
    """A row per layer, a column per epoch, coloured by density; each cell's number where it fits
    (`height`: the map's height in inches)."""
    total = len(history)
    grid = np.array(
        [[h.get("layer_density", {}).get(n, np.nan) for h in history] for n in layers], dtype=float
    )
    image = ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0.0,
        vmax=max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, 1e-6),
        extent=(0.5, total + 0.5, len(layers) - 0.5, -0.5),
    )
    fig.colorbar(image, ax=ax, label="density (non-zero fraction)", pad=0.01)
    shown, fontsize = _layer_ticks(ax, layers)
    # The heat map's width, estimated (a layout pass to measure it costs more than the whole
    # figure): the figure's, less the layer names (0.6 em a character), the colour bar and margins.
    width = max(1.0, fig.get_figwidth() - 1.8 - max(map(len, shown)) * 0.6 * fontsize / 72)
    columns = numbered_columns(total, width)
    if height * 0.8 / len(layers) >= _CELL_NUMBER_HEIGHT and len(layers) * len(columns) <= _MAX_CELL_NUMBERS:
        _cell_numbers(ax, grid, columns, image.norm.vmax)
    ax.set_ylabel("layer")
    if total > num_train:
        ax.axvline(num_train + 0.5, color="white", lw=1.5, ls="--")
        ax.text(num_train + 0.6, -0.45, " fine-tuning →", color="white", va="top", fontsize=8)


def _layer_ticks(ax, layers: list[str]) -> tuple[list[str], int]:
    """Name the heat map's rows, every one or, on deep models, every n-th so that the names stay
    readable; returns the names shown and their font size."""
    step = max(1, math.ceil(len(layers) / 40))
    shown = [layers[i] for i in range(0, len(layers), step)]
    fontsize = 8 if len(layers) <= 20 else 6
    ax.set_yticks(range(0, len(layers), step), shown, fontsize=fontsize)
    return shown, fontsize


def numbered_columns(total: int, width: float) -> list[int]:
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


def _cell_numbers(ax, grid: np.ndarray, columns: list[int], top: float) -> None:
    """Each cell's density in `columns` as a percentage, dark on the bright cells (above 60% of
    the colour scale's `top`), light on the others."""
    for row in range(grid.shape[0]):
        for col in columns:
            value = grid[row, col]
            if np.isfinite(value):
                ax.text(
                    col + 1,
                    row,
                    f"{value:.1%}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value > 0.6 * top else "white",
                )


def _threshold_and_pruned(ax, history: list[dict], num_train: int, report: Report) -> None:
    """The threshold H at the end of each epoch (log scale where it stays positive), in front of
    bars of the weights pruned per epoch; a note instead where a method has neither."""
    total = len(history)
    epochs = np.arange(1, total + 1)
    thresholds = [h.get("threshold") for h in history]
    pruned = [h.get("pruned") or 0 for h in history]
    mark_finetune(ax, num_train, total, label=False)
    bars = _pruned_bars(ax, epochs, pruned) if any(pruned) else None
    has_threshold = any(t is not None for t in thresholds)
    if has_threshold:
        values = np.array([np.nan if t is None else t for t in thresholds], dtype=float)
        ax.plot(epochs, values, "o-", ms=3, color="tab:red", label="threshold H (end of epoch)")
        if np.nanmin(values) > 0:
            ax.set_yscale("log")
        ax.set_ylabel("H", color="tab:red")
    if bars is not None or has_threshold:
        # One legend, on the front axes, for the H line and the bars behind.
        handles = ax.get_legend_handles_labels()[0] + (bars.get_legend_handles_labels()[0] if bars else [])
        ax.legend(handles=handles, loc="upper left", fontsize=8)
    else:
        no_data(ax, f"no threshold and nothing pruned (method '{report.method}')", epochs=True)
    epoch_axis(ax, total)
    ax.grid(alpha=0.3)


def _pruned_bars(ax, epochs: np.ndarray, pruned: list[int]):
    """The weights pruned per epoch as grey bars on a y axis of their own, behind `ax`; returns
    that axis."""
    bars = ax.twinx()
    bars.bar(epochs, pruned, width=0.8, color="tab:gray", alpha=0.35, label="weights pruned per epoch")
    bars.set_ylabel("pruned", color="tab:gray")
    ax.set_zorder(bars.get_zorder() + 1)  # the H line in front of the bars
    ax.patch.set_visible(False)
    return bars


def _regrowth_share(ax, history: list[dict], num_train: int, report: Report) -> None:
    """Per epoch, of the weights reallocation switched off, the share it had grown at the
    reallocation just before: near 1 means it mostly prunes the zeros it has just grown (churn),
    low means the grown weights survive and the structure explores."""
    total = len(history)
    shares = [h.get("pruned_grown_share") for h in history]
    mark_finetune(ax, num_train, total, label=False)
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
        no_data(ax, f"no regrowth to measure (method '{report.method}')", epochs=True)
    ax.set_xlabel("epoch")
    epoch_axis(ax, total)
    ax.grid(alpha=0.3)


def _channels_alive(ax, history: list[dict], num_train: int) -> None:
    """Channel removal: the live channels of each channel group, per epoch."""
    groups = list(next(h["channels_alive"] for h in history if h.get("channels_alive")))
    epochs = np.arange(1, len(history) + 1)
    for group, color in zip(groups, colors(len(groups))):
        alive = [(h.get("channels_alive") or {}).get(group, np.nan) for h in history]
        ax.plot(epochs, alive, "o-", ms=2.5, lw=1.2, color=color, label=group)
    mark_finetune(ax, num_train, len(history), label=False)
    ax.set_ylabel("channels alive")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=6, ncol=max(1, math.ceil(len(groups) / 6)))
    if any(h.get("shrinks") for h in history):  # the model was cut smaller as it trained
        _macs_per_sample(ax, history, epochs)
    ax.grid(alpha=0.3)
    epoch_axis(ax, len(history))


def _macs_per_sample(ax, history: list[dict], epochs: np.ndarray) -> None:
    """The model's MACs per sample, on a y axis of its own, the epochs that shrank it marked."""
    macs = ax.twinx()
    macs.plot(epochs, [h.get("macs", np.nan) for h in history], "k--", lw=1, label="MACs per sample")
    for epoch, h in enumerate(history, start=1):
        if h.get("shrinks"):
            macs.axvline(epoch, color="0.75", lw=0.8, zorder=0)
    macs.set_ylabel("MACs per sample\n(grey: epochs that shrank)", fontsize=8)
    macs.set_ylim(bottom=0)
    macs.legend(loc="lower left", fontsize=6)


# -- layer_density.png -----------------------------------------------------------------------
def layer_density(report: Report):
    """The final density of each sparse layer as read off the exported weights, against the
    model's overall density."""
    density = report.layer_density
    fig = new_figure(max(6.0, min(16.0, 2.5 + 0.35 * len(density))), 4.2)
    ax = fig.subplots()
    ax.set_title(f"{report.name}: final density per sparse layer")
    if not density:
        no_data(ax, "no sparse layers")
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
