"""Accuracy against measured onnxruntime latency on the full CIFAR-10 with augmentation: does
dsrpipe's fast model beat the obvious alternative, a uniformly thinner dense net trained directly?

Two models, each a `dsrpipe compare` grid in bench/grids/ (so a grid resumes where it stopped,
over as many sittings as it takes): plain-cnn (six 3x3 convs, VGG-style) and wrn-10-2 (residual).
Rows, two seeds each: dense; thin dense at four widths; prune-channels from the dense run at
latency targets 0.5 and 0.3 of dense; dsrpipe (DSR with channel removal to the same latency
targets) speed first (`dense_inside: true`) and smallest file; and on plain-cnn, speed first on
other epochs, to place it against thin dense's training time (at latency 0.5: 6, 12 and 15, the
last the epochs of prune-channels with its dense run; at 0.3: 7 and 8), and to a MAC target
rather than a latency one (`lean-*`: thin dense's MACs at the latencies fast-* reach).
From the project root:

    python bench/pareto.py run plain-cnn          # or wrn-10-2; runs/resumes its grid, 2 runs at a time
    python bench/pareto.py report                 # the table, the JSON rows and the two plots
    python bench/pareto.py run plain-cnn --quick  # 2,000 images, 2 epochs, into /tmp: checks the machinery

Latency and throughput are ratios to the seed-0 dense model of the architecture: `report` times
every exported model of a grid again, all in one process and taking turns, so that runs made at
different times on a busy machine still compare (each run's own side-by-side figure from
`validate` stays in rows.json). A dsrpipe row is compared with the thin dense rows at its own
measured latency: their top-1 interpolated linearly between the two thin widths around it.
Training time is compared the same way, re-timed on the quiet machine (`retime_training`).

Writes bench/results/pareto/: rows.json (one row per run), pareto.md, accuracy-vs-latency.png and
accuracy-vs-bytes.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from dsrpipe.checkpoint import load_checkpoint
from dsrpipe.deploy.validate import time_side_by_side
from dsrpipe.report import Report
from dsrpipe.trained import Checkpoint, build_model

ROOT = Path(__file__).resolve().parent.parent
GRIDS = {name: ROOT / "bench" / "grids" / f"pareto-{name}.yaml" for name in ("plain-cnn", "wrn-10-2")}
RUNS = ROOT / "bench" / "results" / "pareto" / "runs"
OUT = ROOT / "bench" / "results" / "pareto"
FAMILIES = {  # a row's family (its name without the target) -> what the table and the plots call it
    "dense": "dense",
    "thin": "thin dense (trained directly)",
    "prune": "prune-channels from dense",
    "fast": "dsrpipe, speed first",
    "fast-short": "dsrpipe, speed first, fewer epochs (6 at 0.5, 7 at 0.3)",
    "fast-mid": "dsrpipe, speed first, 12 epochs at 0.5, 8 at 0.3",
    "fast-long": "dsrpipe, speed first, 15 epochs (prune-channels' with its dense run)",
    "lean": "dsrpipe, speed first, to a MAC target (thin's MACs)",
    "fast-floor": "dsrpipe, speed first, each layer keeping half its channels (floor 0.5)",
    "small": "dsrpipe, smallest file",
}
BASELINES = ("dense", "thin", "prune")  # what every other family, dsrpipe's, is compared with
# Re-timing every model of a grid together: runs of each, and onnxruntime threads (one: the
# figure a 2-core machine with other work on it can measure steadily).
RETIME_LATENCY_RUNS, RETIME_THROUGHPUT_RUNS, RETIME_THREADS = 300, 30, 1
# Re-timing every final model's training step the same way (torch's own threads, the grids' batch).
STEP_BATCH, STEP_RUNS, STEP_ROUNDS = 128, 8, 3
# Runs at a time, by default: two runs of one thread each train wrn-10-2 about a fifth faster on 2
# cores than one run on both (0.67 s a step each, against 0.40; batch 128). Their wall times then
# share the machine, which `report` corrects by re-timing on the quiet machine.
JOBS = 2
QUICK = {"epochs": 2, "end_epoch": 1, "stop_rewire_epoch": 1, "milestones": [1]}


def family(row: str) -> str:
    """The row's name without its target: fast-50 -> fast, fast-50-short -> fast-short."""
    return "-".join(part for part in row.split("-") if not part.isdigit())


def quick_grid(grid: dict) -> dict:
    """The grid on 2,000 training images for 2 epochs: every epoch setting scaled down to fit."""

    def shrink(node):
        if isinstance(node, dict):
            return {k: QUICK[k] if k in QUICK else shrink(v) for k, v in node.items()}
        return node

    grid = shrink(grid)
    grid["base"]["data"].update(max_train=2000, max_test=1000)
    grid["base"]["sparsity"]["rewire_periods"] = {0: 5}
    grid["name"] += "-quick"
    return grid


def run(model: str, quick: bool, jobs: int) -> None:
    grid, out = GRIDS[model], RUNS
    if quick:
        folder = Path(tempfile.mkdtemp(prefix="pareto-quick-"))
        raw = quick_grid(yaml.safe_load(grid.read_text()))
        raw["base"]["data"]["root"] = str((grid.parent / raw["base"]["data"]["root"]).resolve())
        grid, out = folder / grid.name, folder / "runs"
        grid.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "dsrpipe", "compare", str(grid), "--out", str(out), "--jobs", str(jobs)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=False)
    if quick:
        report([out])


def measured_rows(runs_root: Path) -> list[dict]:
    """One row per finished run of every pareto grid under `runs_root`."""
    rows = []
    for results in sorted(runs_root.glob("*/results.csv")):
        grid = results.parent
        for line in csv.DictReader(results.open()):
            report_path = grid / "runs" / line["run"] / "report.json"
            if line["status"] not in ("ok", "validation-failed") or not report_path.is_file():
                continue
            report = Report.from_dict(json.loads(report_path.read_text()))
            history = [
                json.loads(h) for h in (grid / "runs" / line["run"] / "train" / "metrics.jsonl").open()
            ]
            rows.append(
                {
                    "grid": grid.name,
                    "model": report.model,
                    "row": line["method"],
                    "family": family(line["method"]),
                    "seed": int(line["seed"]),
                    "onnx_top1": report.onnx_top1,
                    "latency_ratio": 1 / report.speedup["latency_p50"],  # of dense, batch 1
                    "throughput_ratio": report.speedup["throughput"],  # over dense, batch 64
                    "latency_p50_ms": report.latency_ms["p50"],
                    "onnx": str(grid / "runs" / line["run"] / "model.onnx"),
                    "onnx_bytes": report.onnx_bytes,
                    "nonzero_params": report.nonzero_params,
                    "macs": (report.shrink or {}).get("macs_after"),
                    "train_seconds": float(line["train_seconds"]) if line["train_seconds"] else None,
                    # what training cost in arithmetic: the same on a busy machine as on a quiet one
                    "train_mac_images": (report.training or {}).get("mac_images"),
                    "epochs": int(line["epochs"]) if line["epochs"] else None,
                    "widths": history[-1].get("channels_alive"),
                    "cpu": (report.cpu or {}).get("model_name"),
                }
            )
    return rows


def retime(rows: list[dict]) -> None:
    """Each model's exported files timed again, all in one process, taking turns: batch-1 latency
    and batch-64 throughput as ratios to the seed-0 dense model of that architecture. Each run's
    validate already timed it beside dense, but at its own time: on a busy machine the ratio of a
    model to itself came out 0.9. The validate figures stay in rows.json as `validate_*`."""
    for model in sorted({r["model"] for r in rows}):
        runs = [r for r in rows if r["model"] == model and Path(r["onnx"]).is_file()]
        dense = min((r for r in runs if r["family"] == "dense"), key=lambda r: r["seed"], default=None)
        if dense is None:
            continue
        image = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
        timed = time_side_by_side(
            [Path(r["onnx"]) for r in runs],
            image,
            latency_runs=RETIME_LATENCY_RUNS,
            throughput_runs=RETIME_THROUGHPUT_RUNS,
            threads=RETIME_THREADS,
        )
        reference = timed[runs.index(dense)]
        for r, t in zip(runs, timed):
            r["validate_latency_ratio"], r["validate_throughput_ratio"] = (
                r["latency_ratio"],
                r["throughput_ratio"],
            )
            r["latency_ratio"] = t["latency_ms"]["p50"] / reference["latency_ms"]["p50"]
            r["throughput_ratio"] = t["images_per_s"] / reference["images_per_s"]
            r["latency_p50_ms"] = t["latency_ms"]["p50"]


def step_seconds(models: list[torch.nn.Module]) -> list[float]:
    """Median seconds of one training step (forward, backward, SGD update) of each model at the
    grids' batch, the models taking turns over STEP_ROUNDS rounds so that machine noise hits all."""
    images = torch.randn(STEP_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(STEP_BATCH) % 10
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in models]

    def step(model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    times: list[list[float]] = [[] for _ in models]
    for _ in range(STEP_ROUNDS):
        for model, optimizer, seconds in zip(models, optimizers, times):
            model.train()
            step(model, optimizer)  # warm-up: the allocator and oneDNN's kernel choice
            start = time.perf_counter()
            for _ in range(STEP_RUNS):
                step(model, optimizer)
            seconds.append((time.perf_counter() - start) / STEP_RUNS)
    return [statistics.median(s) for s in times]


def retime_training(rows: list[dict]) -> None:
    """Each run's training time as it would be on the quiet machine: the wall times in the grid's
    results are honest only for runs that had the machine to themselves, and several did not.
    Each run's final model (its learned widths) is rebuilt from its checkpoint and its training
    step timed beside every other's (`step_seconds`); the run's time is then that step's time per
    image × its forward MACs × images over training / the final model's MACs, so the epochs before
    the last shrink count at their MACs. Compute only: decoding and augmenting the images cost
    every row the same per image, which would bring every ratio nearer 1. A plain step: DSR's
    masking and reallocation are left out (small beside the step for speed first, whose masks go
    at the fill; the smallest-file rows mask every step)."""
    runs = [r for r in rows if r["macs"] and r["train_mac_images"]]
    models = []
    for r in runs:
        checkpoint = Checkpoint.from_dict(load_checkpoint(Path(r["onnx"]).parent / "train" / "final.pt"))
        models.append(build_model(checkpoint.model_spec))
    for r, seconds in zip(runs, step_seconds(models)):
        r["train_step_ms"] = 1000 * seconds
        r["train_seconds_quiet"] = seconds / STEP_BATCH * r["train_mac_images"] / r["macs"]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over the seeds of each model's rows."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["row"]), []).append(r)
    out = []
    for (model, row), runs in groups.items():

        def mean(key, runs=runs):
            values = [r[key] for r in runs if r.get(key) is not None]
            return statistics.mean(values) if values else None

        top1 = [r["onnx_top1"] for r in runs]
        out.append(
            {
                "model": model,
                "row": row,
                "family": family(row),
                "seeds": len(runs),
                "top1": statistics.mean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                **{
                    k: mean(k)
                    for k in (
                        "latency_ratio",
                        "throughput_ratio",
                        "onnx_bytes",
                        "train_seconds",
                        "train_seconds_quiet",
                        "train_mac_images",
                        "macs",
                    )
                },
                "epochs": runs[0]["epochs"],
                "widths": runs[0]["widths"],
            }
        )
    return sorted(out, key=lambda g: (g["model"], list(FAMILIES).index(g["family"]), -g["latency_ratio"]))


def thin_rows(groups: list[dict], model: str) -> list[dict]:
    """The model's thin dense rows, fastest first."""
    return sorted(
        (g for g in groups if g["model"] == model and g["family"] == "thin"), key=lambda g: g["latency_ratio"]
    )


def thin_at(groups: list[dict], model: str, latency: float, key: str = "top1") -> float | None:
    """The thin dense rows' `key` at this latency, linear between the two widths around it; None
    outside their range."""
    thin = thin_rows(groups, model)
    if len(thin) < 2 or not thin[0]["latency_ratio"] <= latency <= thin[-1]["latency_ratio"]:
        return None
    return float(np.interp(latency, [t["latency_ratio"] for t in thin], [t[key] for t in thin]))


def beyond_thin(groups: list[dict], g: dict) -> str:
    """A row outside the thin widths' latencies, against the thin net nearest it: where the row is
    faster than the fastest and still more accurate, it beats the thin line wherever that goes."""
    thin = thin_rows(groups, g["model"])
    if not thin:
        return "no thin rows"
    fastest = thin[0]
    if g["latency_ratio"] >= fastest["latency_ratio"]:
        return "slower than every thin width"
    beats = "and more accurate" if g["top1"] > fastest["top1"] else "but less accurate"
    lead = 100 * (g["top1"] - fastest["top1"])
    return f"{lead:+.2f} pts over {fastest['row']} ({fastest['latency_ratio']:.3f}): faster {beats}"


def ratio(over: float | None, under: float | None) -> str:
    return f"{over / under:.2f}×" if over and under else ""


def comparison(groups: list[dict]) -> list[str]:
    """Per dsrpipe row: its lead over thin dense and over prune-channels at the same target, and
    its training cost over thin dense's: in time on the quiet machine (`retime_training`), and in
    MACs × images (what the arithmetic cost, which another process on the machine does not
    change); and what prune-channels cost to train in MACs × images, the dense run it starts from
    included, over this row's."""
    lines = [
        "| model | row | top-1 | latency (of dense) | thin dense there | lead | prune-channels, same target | lead "
        "| train time (quiet) / thin's | train MACs / thin's | prune's train MACs (with its dense run) / this row's |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_row = {(g["model"], g["row"]): g for g in groups}
    for g in groups:
        if g["family"] in BASELINES:
            continue
        thin = thin_at(groups, g["model"], g["latency_ratio"])
        thin_seconds = thin_at(groups, g["model"], g["latency_ratio"], "train_seconds_quiet")
        thin_macs = thin_at(groups, g["model"], g["latency_ratio"], "train_mac_images")
        prune = by_row.get((g["model"], "prune-" + g["row"].split("-")[1]))  # the same latency target
        dense = by_row.get((g["model"], "dense"))
        prune_macs = (
            prune["train_mac_images"] + dense["train_mac_images"]
            if prune and dense and prune["train_mac_images"] and dense["train_mac_images"]
            else None
        )
        cells = [
            f"{100 * g['top1']:.2f} ± {100 * g['top1_std']:.2f}",
            f"{g['latency_ratio']:.3f}",
            "" if thin is None else f"{100 * thin:.2f}",
            beyond_thin(groups, g) if thin is None else f"{100 * (g['top1'] - thin):+.2f} pts",
            "" if prune is None else f"{100 * prune['top1']:.2f} ± {100 * prune['top1_std']:.2f}",
            "" if prune is None else f"{100 * (g['top1'] - prune['top1']):+.2f} pts",
            ratio(g["train_seconds_quiet"], thin_seconds),
            ratio(g["train_mac_images"], thin_macs),
            ratio(prune_macs, g["train_mac_images"]),
        ]
        lines.append(f"| {g['model']} | {g['row']} | " + " | ".join(cells) + " |")
    return lines


def table(groups: list[dict]) -> list[str]:
    lines = [
        "| model | row | top-1 % (mean ± std) | seeds | latency b1 (of dense) | throughput b64 (× dense) | "
        "bytes | MACs | epochs | train s (wall) | train s (quiet) | widths (seed 0) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for g in groups:
        widths = "/".join(str(n) for n in g["widths"].values()) if g["widths"] else ""
        lines.append(
            f"| {g['model']} | {g['row']} | {100 * g['top1']:.2f} ± {100 * g['top1_std']:.2f} | {g['seeds']} | "
            f"{g['latency_ratio']:.3f} | {g['throughput_ratio']:.2f} | {g['onnx_bytes']:,.0f} | "
            f"{g['macs'] or 0:,.0f} | {g['epochs']} | {g['train_seconds'] or 0:.0f} | "
            f"{g['train_seconds_quiet'] or 0:.0f} | {widths} |"
        )
    return lines


def plots(groups: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({g["model"] for g in groups})
    markers = dict(zip(FAMILIES, "o^vsPhX*pD"))
    colours = {fam: f"C{i}" for i, fam in enumerate(FAMILIES)}  # a family's colour is the same in each panel
    for name, key, label in (
        (
            "accuracy-vs-latency.png",
            "latency_ratio",
            "batch-1 latency, share of dense (onnxruntime, side by side)",
        ),
        ("accuracy-vs-bytes.png", "onnx_bytes", "model file bytes"),
    ):
        figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 6), squeeze=False)
        for ax, model in zip(axes[0], models):
            for fam, title in FAMILIES.items():
                points = sorted(
                    (g for g in groups if g["model"] == model and g["family"] == fam), key=lambda g: g[key]
                )
                if points:
                    ax.errorbar(
                        [g[key] for g in points], [100 * g["top1"] for g in points],
                        yerr=[100 * g["top1_std"] for g in points], marker=markers[fam], capsize=3, color=colours[fam],
                        linestyle="-" if fam in ("thin", "fast", "small", "prune") else "none", label=title,
                    )  # fmt: skip
            ax.set_title(f"{model}, CIFAR-10")
            ax.set_xlabel(label)
            ax.set_ylabel("top-1 %")
            if key == "onnx_bytes":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        # one legend for every panel, below them, clear of the points
        shown = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
        figure.legend(shown.values(), shown.keys(), fontsize=8, loc="lower center", ncol=3)
        figure.tight_layout(rect=(0, 0.16, 1, 1))
        figure.savefig(folder / name, dpi=120)
        plt.close(figure)


def report(runs_roots: list[Path], folder: Path | None = None) -> None:
    rows = [r for root in runs_roots for r in measured_rows(root)]
    if not rows:
        sys.exit(f"no finished runs under {', '.join(map(str, runs_roots))}")
    folder = folder or runs_roots[0].parent
    retime(rows)
    retime_training(rows)
    groups = summarise(rows)
    (folder / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    cpus = sorted({r["cpu"] for r in rows if r["cpu"]})
    text = [
        "# Accuracy against latency on CIFAR-10 (bench/pareto.py)",
        "",
        f"CPU: {', '.join(cpus) or 'unknown'}. Latency (batch 1) and throughput (batch 64) are ratios to the "
        f"seed-0 dense model, all of a model's exports timed together in one process, taking turns "
        f"({RETIME_THREADS} onnxruntime thread). Train MACs: forward multiply-accumulates over training, "
        f"as the model shrank. Train s (wall): each run's own, some beside other work; (quiet): each final "
        f"model's training step timed beside every other's, × the run's MACs × images over its MACs "
        f"(compute only; `retime_training`).",
        "",
        *table(groups),
        "",
        "## dsrpipe against the obvious alternatives at the same latency",
        "",
        *comparison(groups),
        "",
    ]
    (folder / "pareto.md").write_text("\n".join(text))
    plots(groups, folder)
    print("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("model", choices=sorted(GRIDS))
    go.add_argument("--quick", action="store_true")
    go.add_argument("--jobs", type=int, default=JOBS)
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        run(args.model, args.quick, args.jobs)
    else:
        report([RUNS], OUT)


if __name__ == "__main__":
    main()
