"""What training costs: dense, element DSR, DSR with channel removal held at zero in the full
model (masked) and cut out of it as it goes (shrinking, at the default end of removal and an
earlier one), and thin dense models of the shrunk shape and of the sparse budget → top-1, train
wall time and its ratio to dense, forward MACs × images, seconds per epoch before and after the
last shrink, peak RSS, and the deployed model's onnxruntime speed against dense at batch 1 and 64.

Every run is its own `dsrpipe run` process (so that peak RSS is the run's own), all of them in one
invocation, seed by seed, so that the rows run side by side on the same machine. From the project
root:

    python bench/train_cost.py cifar10 --seeds 0 1      # small-cnn, 40,000 CIFAR-10 images, 5 epochs
    python bench/train_cost.py cifar10-subset-wrn --seeds 0 1   # a residual network: WRN-10-2, 3,000 images

Writes bench/results/train_cost/<dataset>.{md,json} and <dataset>-accuracy-vs-train-time.png; the
runs go to bench/results/train_cost/runs/. `--replot` redraws from the .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from deploy_table import DATASETS, DSR, REWIRE, ROOT, SHAPE_BUDGET, slug

from dsrpipe import files
from dsrpipe.report import Report

OUT = ROOT / "bench" / "results" / "train_cost"
REMOVAL = "sparsity.remove_channels={share: 0.5%s}"
ROWS = {  # label -> overrides of the quickstart (with the dataset's)
    "dense": ["sparsity.method=dense"],
    "element DSR 0.9": DSR,
    "DSR 0.9 + removal 0.5, masked": [*DSR, REMOVAL % ", shrink: false"],
    "DSR 0.9 + removal 0.5, shrinking": [*DSR, REMOVAL % ""],
    "DSR 0.9 + removal 0.5, shrinking, removal done by epoch 1": [*DSR, REMOVAL % ", end_epoch: 1"],
    "thin dense at the removal 0.5 shape": ["sparsity.method=thin-dense", SHAPE_BUDGET],
    "thin dense at the 0.9 budget": ["sparsity.method=thin-dense", "sparsity.sparsity=0.9"],
}
# the rows the claims rest on get every seed; element DSR is there for reference
ONE_SEED = {"element DSR 0.9"}
# A residual network, whose streams' channels shrink in every layer that writes or reads them:
# WRN-10-2 at 32x32 on the deployment table's CIFAR-10 subset (3,000 images, 10 epochs).
SUBSET = DATASETS["cifar10-subset"]
DATASETS = {
    **DATASETS,
    "cifar10-subset-wrn": [
        *(o for o in SUBSET if not o.startswith("sparsity.")),
        "model.name=wrn-10-2",
        "model.options={}",
    ],
}
REWIRE = {**REWIRE, "cifar10-subset-wrn": [o for o in SUBSET if o.startswith("sparsity.")]}
RESIDUAL_ROWS = ("dense", "DSR 0.9 + removal 0.5, masked", "DSR 0.9 + removal 0.5, shrinking")


def measure(dataset: str, label: str, seed: int) -> dict:
    name = f"{dataset}-{slug(label)}-seed{seed}"
    overrides = [*DATASETS[dataset], f"name={name}", f"seed={seed}", *ROWS[label], "validate.min_top1=null"]
    if "DSR" in label:
        overrides += REWIRE.get(dataset, [])
    command = [sys.executable, "-m", "dsrpipe", "run", str(ROOT / "pipelines" / "quickstart.yaml")]
    command += ["--out", str(OUT / "runs"), "--force", "--no-progress"]
    command += [arg for o in overrides for arg in ("--set", o)]
    print(f"{label}, seed {seed}", flush=True)
    subprocess.run(command, check=True)
    run = OUT / "runs" / name
    report = Report.from_dict(json.loads((run / "report.json").read_text()))
    epochs = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    last_shrink = max((e["epoch"] for e in epochs if e.get("shrinks")), default=0)
    after = [e["seconds"] for e in epochs if e["epoch"] > last_shrink]
    training = report.training
    return {
        "row": label,
        "seed": seed,
        "onnx_top1": report.onnx_top1,
        "nonzero_params": report.nonzero_params,
        "train_seconds": training["train_seconds"],
        "mac_images": training["mac_images"],
        "peak_rss_bytes": training["peak_rss_bytes"],
        "shrinks": len(training["shrinks"]),
        "macs_start": epochs[0]["macs_at_start"],
        "macs_end": epochs[-1]["macs"],
        "epoch_seconds_first": epochs[0]["seconds"],
        # the epochs after the one with the last shrink (all of them where nothing shrank)
        "epoch_seconds_after": statistics.mean(after) if after else None,
        "speedup": report.speedup,
    }


def _mean(runs: list[dict], key: str, sub: str | None = None) -> float:
    values = [(r[key] or {}).get(sub) if sub else r[key] for r in runs]
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else float("nan")


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["row"], []).append(r)
    return groups


def table(rows: list[dict]) -> str:
    groups = _groups(rows)
    dense = groups.get("dense", [])
    dense_seconds, dense_macs = _mean(dense, "train_seconds"), _mean(dense, "mac_images")
    lines = [
        "| row | top-1 (mean ± std, seeds) | non-zero params | train s | vs dense | MACs × images | "
        "vs dense | s/epoch first | s/epoch after shrink | peak RSS MiB | speed b1 | speed b64 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in groups.items():
        top1 = [r["onnx_top1"] for r in runs]
        spread = f" ± {statistics.stdev(top1):.4f}" if len(top1) > 1 else ""
        seconds, macs = _mean(runs, "train_seconds"), _mean(runs, "mac_images")
        lines.append(
            f"| {label} | {statistics.mean(top1):.4f}{spread} ({len(runs)}) | "
            f"{round(_mean(runs, 'nonzero_params')):,} | {seconds:.0f} | {seconds / dense_seconds:.2f}× | "
            f"{macs:.3g} | {macs / dense_macs:.2f}× | {_mean(runs, 'epoch_seconds_first'):.1f} | "
            f"{_mean(runs, 'epoch_seconds_after'):.1f} | {_mean(runs, 'peak_rss_bytes') / 2**20:,.0f} | "
            f"{_mean(runs, 'speedup', 'latency_p50'):.2f}× | {_mean(runs, 'speedup', 'throughput'):.2f}× |"
        )
    return "\n".join(lines) + "\n"


def picture(rows: list[dict], path: Path, title: str) -> None:
    """Top-1 against training wall time, one point per row (mean over seeds, bars: min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 4.8))
    groups = _groups(rows)
    colors = plt.get_cmap("tab10")
    for k, (label, runs) in enumerate(groups.items()):
        seconds = [r["train_seconds"] for r in runs]
        top1 = [r["onnx_top1"] for r in runs]
        x, y = statistics.mean(seconds), statistics.mean(top1)
        ax.errorbar(
            x,
            y,
            xerr=[[x - min(seconds)], [max(seconds) - x]],
            yerr=[[y - min(top1)], [max(top1) - y]],
            fmt="o",
            color=colors(k),
            capsize=3,
            label=label,
        )
    ax.set_xlabel("training wall time, s (train + fine-tune steps)")
    ax.set_ylabel("top-1, ONNX (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="measure these rows only")
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    results = OUT / f"{args.dataset}.json"
    if args.replot:
        rows = json.loads(results.read_text())
    else:
        labels = args.rows or (RESIDUAL_ROWS if "wrn" in args.dataset else list(ROWS))
        runs = [  # seed by seed: every row of a seed runs before the next seed's
            (label, seed)
            for k, seed in enumerate(args.seeds)
            for label in labels
            if k == 0 or label not in ONE_SEED
        ]
        rows = []
        for label, seed in runs:
            rows.append(measure(args.dataset, label, seed))
            files.write_json(results, sorted(rows, key=lambda r: (list(ROWS).index(r["row"]), r["seed"])))
        rows = json.loads(results.read_text())
    files.write_text(OUT / f"{args.dataset}.md", table(rows))
    picture(
        rows,
        OUT / f"{args.dataset}-accuracy-vs-train-time.png",
        f"{args.dataset}: accuracy against training time",
    )
    print(table(rows))


if __name__ == "__main__":
    main()
