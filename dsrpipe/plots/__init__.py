"""Pictures of a run, beside its report.json, and of a `dsrpipe compare` grid.

  curves.png             train/test loss and top-1 per epoch; fine-tuning continues the x axis
  density_over_time.png  density of each sparse layer per epoch (how DSR moves parameters between
                         layers), the adaptive threshold H with the weights pruned per epoch, and
                         the share of pruned weights that had been grown at the reallocation before
  layer_density.png      final density per layer, read off the exported weights
  report.md              the report's key numbers and the three pictures

run_figures.py draws the run's pictures, markdown.py writes report.md and grid_figure.py draws the
grid's picture, all on canvas.py's figures: Agg, never pyplot, so no global matplotlib state
changes under a caller. Every file is written atomically: a reader sees the old file or the new
one.
"""

from __future__ import annotations

from pathlib import Path

from .. import files
from ..report import Report
from .canvas import save
from .grid_figure import write_accuracy_vs_params
from .markdown import run_markdown
from .run_figures import curves, density_over_time, layer_density

RUN_PLOTS = ("curves.png", "density_over_time.png", "layer_density.png")
RUN_FILES = RUN_PLOTS + ("report.md",)  # report.md is written last: it existing means all exist

__all__ = ["RUN_FILES", "RUN_PLOTS", "run_markdown", "write_accuracy_vs_params", "write_run_plots"]


def write_run_plots(
    run_dir: Path, history_train: list[dict], history_finetune: list[dict], report: Report
) -> list[Path]:
    """Write the three PNGs and report.md into `run_dir` (beside report.json); returns their paths."""
    run_dir = Path(run_dir)
    history = list(history_train) + list(history_finetune)
    num_train = len(history_train)
    written = [
        save(curves(history, num_train, report), run_dir / "curves.png"),
        save(density_over_time(history, num_train, report), run_dir / "density_over_time.png"),
        save(layer_density(report), run_dir / "layer_density.png"),
    ]
    files.write_text(run_dir / "report.md", run_markdown(report, num_train, len(history_finetune)))
    return written + [run_dir / "report.md"]
