"""A grid's results: results.csv (one row per run), results.md (one line per method × sparsity,
mean ± standard deviation over seeds) and accuracy_vs_params.png."""

from __future__ import annotations

import csv
import io
import statistics
import time
from pathlib import Path
from typing import Any

from .. import __version__, files
from ..config import METHOD_OPTIONS
from ..plots import write_accuracy_vs_params
from .grid import Run

CSV_COLUMNS = [
    "method",
    "sparsity",
    "seed",
    "nonzero_params",
    "total_params",
    "torch_top1",
    "onnx_top1",
    "train_seconds",
    "mac_images",
    "peak_rss_mib",
    "epochs",
    "status",
    "measured_sparsity",
    "top1_agreement",
    "latency_p50_ms",
    "onnx_bytes",
    "run",
    "message",
]


def total_epochs(run: Run, by_name: dict[str, Run]) -> int | None:
    """Every epoch of training behind the run: its own training and fine-tuning, and those of the
    run it starts from (prune and prune-channels start from a trained dense model)."""
    if run.report is None:
        return None
    own = run.report.train_epochs + run.report.finetune_epochs
    source = by_name.get(run.depends_on) if run.depends_on is not None else None
    if source is not None and not METHOD_OPTIONS[source.method].keeps_every_weight:
        return own  # a source that is a row of its own (frozen's dsr) counts there
    if run.depends_on is None:
        return own
    before = total_epochs(source, by_name) if source is not None else None
    return None if before is None else own + before


def _row(run: Run, epochs: int | None = None) -> dict[str, Any]:
    """A run's line of results.csv; the columns from its report are left out where it has none."""
    row = {
        "method": run.row or run.method,
        "sparsity": run.sparsity,
        "seed": run.seed,
        "train_seconds": None if run.train_seconds is None else round(run.train_seconds, 3),
        "epochs": epochs,
        "status": run.status,
        "run": run.name,
        "message": run.message,
    }
    r = run.report
    if r is not None:
        training = r.training or {}
        row |= {
            "nonzero_params": r.nonzero_params,
            "total_params": r.total_params,
            "torch_top1": r.torch_top1,
            "onnx_top1": r.onnx_top1,
            "mac_images": training.get("mac_images"),
            "peak_rss_mib": round(training["peak_rss_bytes"] / 2**20, 1)
            if training.get("peak_rss_bytes")
            else None,
            "measured_sparsity": r.sparsity,
            "top1_agreement": r.top1_agreement,
            "latency_p50_ms": (r.latency_ms or {}).get("p50"),
            "onnx_bytes": r.onnx_bytes,
        }
    return row


def _reference_method() -> str:
    """The method the others' training time is given against: the registry's `reference` (dense)."""
    return next((name for name, options in METHOD_OPTIONS.items() if options.reference), "the reference")


def group_results(runs: list[Run]) -> list[dict[str, Any]]:
    """One entry per method × sparsity, over the runs that produced a report. `reference`: the
    row of the reference method itself (not a variant of it), whose training time the others'
    are given against."""
    by_name = {r.name: r for r in runs}
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.row or run.method, run.sparsity), []).append(run)
    entries = []
    for (method, sparsity), members in groups.items():
        measured = [r for r in members if r.report is not None]
        top1 = [r.report.onnx_top1 for r in measured]
        seconds = [r.train_seconds for r in measured if r.train_seconds is not None]
        costs = [r.report.training or {} for r in measured]
        mac_images = [c["mac_images"] for c in costs if c.get("mac_images")]
        rss = [c["peak_rss_bytes"] for c in costs if c.get("peak_rss_bytes")]
        epochs = [e for r in measured if (e := total_epochs(r, by_name)) is not None]
        entries.append(
            {
                "method": method,
                "sparsity": sparsity,
                "runs": len(members),
                "n": len(measured),
                "crashed": sum(r.status == "crashed" for r in members),
                "below_threshold": sum(r.status == "validation-failed" for r in members),
                "params": statistics.mean(r.report.nonzero_params for r in measured) if measured else None,
                "total_params": statistics.mean(r.report.total_params for r in measured)
                if measured
                else None,
                "top1_mean": statistics.mean(top1) if top1 else None,
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
                "seconds_mean": statistics.mean(seconds) if seconds else None,
                "mac_images_mean": statistics.mean(mac_images) if mac_images else None,
                "peak_rss_mean": statistics.mean(rss) if rss else None,
                "epochs": max(epochs) if epochs else None,
                "reference": method == members[0].method and METHOD_OPTIONS[method].reference,
            }
        )
    return entries


def write_results(folder: Path, runs: list[Run], *, command: str) -> dict[str, Path]:
    folder = Path(folder)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    by_name = {r.name: r for r in runs}
    for run in runs:
        row = _row(run, total_epochs(run, by_name))
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    paths = {
        "csv": folder / "results.csv",
        "md": folder / "results.md",
        "plot": folder / "accuracy_vs_params.png",
    }
    files.write_text(paths["csv"], buffer.getvalue())
    groups = group_results(runs)
    write_accuracy_vs_params(paths["plot"], groups, title=f"{folder.name}: top-1 against non-zero parameters")
    files.write_text(paths["md"], _markdown(folder.name, runs, groups, command))
    return paths


def _markdown(grid_name: str, runs: list[Run], groups: list[dict[str, Any]], command: str) -> str:
    cfg = next((r.cfg for r in runs if r.cfg is not None), None)
    reference = _reference_method()
    lines = [f"# {grid_name}: {len(runs)} runs", ""]
    if cfg is not None:
        tune = f" + {cfg.finetune.epochs} fine-tuning" if cfg.finetune.epochs else ""
        lines += [
            f"{cfg.model.name} on {cfg.data.dataset}, {cfg.train.epochs} training{tune} epochs per run "
            f"(before per-method overrides).",
            "",
        ]
    lines += [
        "Top-1: the exported ONNX model on the test split, mean ± sample standard deviation over seeds. "
        "Params: non-zero parameters of the whole model (dense layers included). Train time: seconds "
        f"of training and fine-tuning epochs per run, mean, and against {reference} where the grid has it. "
        "MACs × images: forward multiply-accumulates of the model as it was at each step, summed over the "
        "images trained on (a model that shrinks while it trains costs less). Peak RSS: the run's process. "
        "Epochs: all the training behind a run, the dense run it starts from included (prune, prune-channels).",
        "",
        f"| method | sparsity | params (non-zero) | top-1 (%) | train time (s) | vs {reference} | MACs × images "
        "| peak RSS (MiB) | epochs | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    seconds = next((g["seconds_mean"] for g in groups if g["reference"] and g["seconds_mean"]), None)
    lines += [_table_line(g, seconds) for g in groups]
    lines += ["", "![Top-1 against non-zero parameters](accuracy_vs_params.png)", ""]
    failed = [r for r in runs if r.status in ("crashed", "validation-failed")]
    if failed:
        lines += ["## Runs that failed", ""]
        lines += [f"- `{r.name}`: {r.status}: {r.message}" for r in failed]
        lines.append("")
    lines += [
        "Per-run numbers: `results.csv`; each run's report: `runs/<run>/report.md`.",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S %z')} (dsrpipe {__version__}).",
        "",
    ]
    return "\n".join(lines)


def _table_line(g: dict[str, Any], reference: float | None) -> str:
    """One method × sparsity of results.md's table (`reference`: the reference row's mean
    training time)."""
    params = "n/a" if g["params"] is None else f"{round(g['params']):,}"
    if g["top1_mean"] is None:
        top1 = "n/a"
    elif g["top1_std"] is None:
        top1 = f"{100 * g['top1_mean']:.2f}"
    else:
        top1 = f"{100 * g['top1_mean']:.2f} ± {100 * g['top1_std']:.2f}"
    seconds = "n/a" if g["seconds_mean"] is None else f"{g['seconds_mean']:.1f}"
    count = str(g["n"]) if g["n"] == g["runs"] else f"{g['n']} of {g['runs']}"
    notes = [f"{g['crashed']} crashed"] * bool(g["crashed"]) + [
        f"{g['below_threshold']} below threshold"
    ] * bool(g["below_threshold"])
    if notes:
        count += f" ({', '.join(notes)})"
    epochs = "n/a" if g["epochs"] is None else str(g["epochs"])
    ratio = f"{g['seconds_mean'] / reference:.2f}×" if reference and g["seconds_mean"] else "n/a"
    macs = "n/a" if g["mac_images_mean"] is None else f"{g['mac_images_mean']:.3g}"
    rss = "n/a" if g["peak_rss_mean"] is None else f"{g['peak_rss_mean'] / 2**20:,.0f}"
    return (
        f"| {g['method']} | {g['sparsity']:g} | {params} | {top1} | {seconds} | {ratio} | {macs} | {rss} "
        f"| {epochs} | {count} |"
    )
