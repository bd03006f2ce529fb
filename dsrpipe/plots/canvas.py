"""What every picture is drawn on, and the marks the run's pictures share.

Figures are `matplotlib.figure.Figure`s with the Agg renderer, never drawn through pyplot, so no
global matplotlib state (backend, open figures) changes under a caller. Every file is written
atomically: a reader sees the old file or the new one.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .. import files

DPI = 110
TRAIN, TEST, FINETUNE = "tab:blue", "tab:orange", "0.92"


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save(figure: Figure, path: Path) -> Path:
    # The temporary file ends in .tmp, so the format is named rather than guessed from the suffix.
    with files.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def mark_finetune(ax, num_train: int, total: int, label: bool) -> None:
    """The fine-tuning epochs (after the first `num_train` of `total`) as a grey band."""
    if total > num_train:
        ax.axvspan(
            num_train + 0.5,
            total + 0.5,
            color=FINETUNE,
            zorder=0,
            label="fine-tuning (masks frozen)" if label else None,
        )


def no_data(ax, message: str, *, epochs: bool = False) -> None:
    """`message` in place of a plot; `epochs`: the epoch axis stays, shared with a plot beside."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    if not epochs:
        ax.set_xticks([])
    ax.set_yticks([])


def epoch_axis(ax, total: int) -> None:
    """Epochs 1..`total` on the x axis, whole numbers only."""
    ax.set_xlim(0.5, total + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def colors(n: int) -> list:
    """`n` distinct colours: tab10's, tab20's past 10."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
