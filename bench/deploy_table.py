"""The deployment table: dense, element DSR, thin dense (a narrower dense model trained from
scratch), channel-granular DSR, DSR with channel removal and channel pruning from a trained dense
model (Torch-Pruning), each in fp32 and int8 → top-1 over seeds, size, and onnxruntime speed
against the dense model of the configured architecture at batch 1 and 64, measured by `validate`
(side by side, one process, see dsrpipe.deploy.validate).

Each row trains once per seed (`dsrpipe run` through the Python API), then exports and validates
the same trained model again with int8 weights. From the project root:

    python bench/deploy_table.py digits --seeds 0 1      # pipelines/quickstart.yaml, the embedded digits
    python bench/deploy_table.py digits-wrn --seeds 0 1  # a residual network (WRN-10-2) on digits
    python bench/deploy_table.py cifar10 --seeds 0 1     # small-cnn, 40,000 CIFAR-10 images, 5 epochs

Writes bench/results/deploy/<dataset>.{md,json} and <dataset>-accuracy-vs-speed.png; the runs go
to bench/results/deploy/runs/. `--replot` redraws the table and the picture from the .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dsrpipe import files
from dsrpipe.config import load_pipeline
from dsrpipe.errors import ValidationFailed
from dsrpipe.pipeline import export_stage, run_pipeline, validate_stage

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "deploy"
# N_p as the quickstart's share (600 of ~8k active weights at 0.9), at any sparsity
DSR = ["sparsity.prune_target=null", "sparsity.prune_fraction=0.08"]
# Pruning a trained model fine-tunes it: at a fifth of the learning rate, for half the epochs
# (digits), or 3 of 5 (CIFAR-10: the channels go in 5 steps over the first 2).
FROM_DENSE = {
    "digits": ["train.epochs=20", "train.lr=0.02", "train.milestones=[10, 15]"],
    "cifar10": ["train.epochs=3", "train.lr=0.02", "train.milestones=[2]", "sparsity.end_epoch=2"],
}
# The budget of removal 0.5's shrunk small-cnn (16/32/64 channels, 24,346 parameters): the dense
# conv1 and fc (2,602) plus 23.6% of the sparse convs' 92,160 weights
SHAPE_BUDGET = "sparsity.sparsity=0.764"
ROWS = {  # label -> overrides of the quickstart
    "dense": ["sparsity.method=dense"],
    "element DSR 0.9": DSR,
    # a narrower dense model with element DSR's parameter budget, trained from scratch: about the
    # MACs of removal 0.75, so what that width learns in the same epochs without any sparsity
    "thin dense at the 0.9 budget": ["sparsity.method=thin-dense", "sparsity.sparsity=0.9"],
    # the same at removal 0.5's shrunk shape (width 16)
    "thin dense at the removal 0.5 shape": ["sparsity.method=thin-dense", SHAPE_BUDGET],
    "channel-granular DSR 0.75": [*DSR, "sparsity.granularity=channel", "sparsity.sparsity=0.75"],
    "DSR 0.9 + channel removal 0.5": [*DSR, "sparsity.remove_channels={share: 0.5}"],
    "DSR 0.9 + channel removal 0.75": [*DSR, "sparsity.remove_channels={share: 0.75}"],
    # at that shape's budget, where removal 0.5 ends nearly dense in the shape
    "element DSR 0.764": [*DSR, SHAPE_BUDGET],
    "DSR 0.764 + channel removal 0.5": [*DSR, SHAPE_BUDGET, "sparsity.remove_channels={share: 0.5}"],
    "prune-channels 0.5 from dense": ["sparsity.method=prune-channels", "sparsity.share=0.5"],
    "prune-channels 0.75 from dense": ["sparsity.method=prune-channels", "sparsity.share=0.75"],
}
DATASETS = {
    "digits": [],  # the quickstart as it is
    "digits-wrn": ["model.name=wrn-10-2", "model.options={}"],
    # The earlier, undertrained CIFAR-10 setting (dense ~51%), which bench/int8_range.py measured
    "cifar10-subset": [
        "data.dataset=imagefolder",
        f"data.root={ROOT.parent / 'shared' / 'datasets' / 'cifar10-jpg.tar.gz'}",
        "data.max_train=3000",
        "data.max_test=2000",
        "train.epochs=10",
        "train.lr=0.05",
        "train.milestones=[6, 8]",
        "sparsity.rewire_periods={0: 25}",
        "sparsity.stop_rewire_epoch=9",
        "finetune.epochs=0",
    ],
    # CIFAR-10 at 32x32, 40,000 training images, 5 epochs, no augmentation: dense small-cnn reaches
    # about 65% and a run takes about 5 minutes on 2 cores.
    "cifar10": [
        "data.dataset=imagefolder",
        f"data.root={ROOT.parent / 'shared' / 'datasets' / 'cifar10-jpg.tar.gz'}",
        "data.max_train=40000",
        "data.max_test=2000",
        "data.augment=false",
        "train.batch_size=128",
        "train.epochs=5",
        "train.lr=0.1",
        "train.milestones=[3, 4]",
        "finetune.epochs=0",
    ],
}
# DSR's schedule where the quickstart's does not fit (iterations per epoch, epochs)
REWIRE = {"cifar10": ["sparsity.rewire_periods={0: 50}", "sparsity.stop_rewire_epoch=4"]}
ONE_SEED = {"channel-granular DSR 0.75"}  # today's channel granularity: for reference, not the claim
WRN_ROWS = ("dense", "element DSR 0.9", "DSR 0.9 + channel removal 0.5", "prune-channels 0.5 from dense")


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in label).strip("-")


def measure(dataset: str, label: str, seed: int) -> list[dict]:
    name = f"{dataset}-{slug(label)}-seed{seed}"
    overrides = [*DATASETS[dataset], f"name={name}", f"seed={seed}", *ROWS[label], "validate.min_top1=null"]
    if "DSR" in label:
        overrides += REWIRE.get(dataset, [])
    if label.startswith("prune-channels"):
        dense = f"{dataset}-dense-seed{seed}"
        overrides.append(f"sparsity.prune_from={OUT / 'runs' / dense / 'train' / 'final.pt'}")
        overrides += FROM_DENSE["cifar10" if dataset == "cifar10" else "digits"]
    rows = []
    for quantize in ("none", "int8"):
        cfg = load_pipeline(
            ROOT / "pipelines" / "quickstart.yaml", [*overrides, f"export.quantize={quantize}"]
        )
        try:
            if quantize == "none":
                report = run_pipeline(cfg, OUT / "runs", progress=False)
            else:  # the same trained model, exported again with int8 weights
                export_stage(cfg, OUT / "runs", force=True)
                report = validate_stage(cfg, OUT / "runs", force=True)
        except ValidationFailed as failed:  # a missed gate is a result too: recorded, not hidden
            report = failed.report
        seconds = sum(
            json.loads(line)["seconds"]
            for stage in ("train", "finetune")
            if (OUT / "runs" / name / stage / "metrics.jsonl").exists()
            for line in (OUT / "runs" / name / stage / "metrics.jsonl").read_text().splitlines()
        )
        epochs = cfg.train.epochs + cfg.finetune.epochs
        if label.startswith("prune-channels"):  # and the dense run it was pruned from
            dense = load_pipeline(
                ROOT / "pipelines" / "quickstart.yaml", [*DATASETS[dataset], *ROWS["dense"]]
            )
            epochs += dense.train.epochs + dense.finetune.epochs
        rows.append(
            {
                "row": label,
                "seed": seed,
                "weights": "int8" if quantize == "int8" else "fp32",
                "epochs": epochs,  # the dense run's included for the rows pruned from it
                "train_seconds": seconds,
                **{
                    k: getattr(report, k)
                    for k in (
                        "onnx_top1",
                        "nonzero_params",
                        "total_params",
                        "onnx_bytes",
                        "dense_onnx_bytes",
                        "size_ratio",
                        "speedup",
                        "shrink",
                        "passed",
                        "failure",
                    )
                },
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| row | weights | top-1 (mean ± std, seeds) | non-zero params | bytes | speed b1 | speed b64 | "
        "params after shrinking | MACs after shrinking | epochs | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["row"], r["weights"]), []).append(r)
    for (label, weights), runs in groups.items():
        top1 = [r["onnx_top1"] for r in runs]
        spread = f" ± {statistics.stdev(top1):.4f}" if len(top1) > 1 else ""

        def mean(key, sub=None, runs=runs):
            return statistics.mean((r[key] or {}).get(sub, float("nan")) if sub else r[key] for r in runs)

        shrink = runs[0]["shrink"] or {}
        lines.append(
            f"| {label} | {weights} | {statistics.mean(top1):.4f}{spread} ({len(runs)}) | "
            f"{round(mean('nonzero_params')):,} | {round(mean('onnx_bytes')):,} | "
            f"{mean('speedup', 'latency_p50'):.2f}× | {mean('speedup', 'throughput'):.2f}× | "
            f"{shrink.get('params_after', runs[0]['total_params']):,} of {runs[0]['total_params']:,} | "
            f"{shrink.get('macs_after', float('nan')):,.0f} | {runs[0]['epochs']} | {mean('train_seconds'):.0f} |"
        )
    return "\n".join(lines) + "\n"


def picture(rows: list[dict], path: Path, title: str) -> None:
    """Top-1 against the speed against dense (batch 1 and batch 64), one point per row and weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["row"], r["weights"]), []).append(r)
    labels = list(dict.fromkeys(r["row"] for r in rows))
    colors = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")  # one colour per row
    times = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}×")
    for ax, (key, batch) in zip(axes, (("latency_p50", "batch 1"), ("throughput", "batch 64"))):
        for (label, weights), runs in groups.items():
            speed = statistics.mean((r["speedup"] or {}).get(key, float("nan")) for r in runs)
            top1 = statistics.mean(r["onnx_top1"] for r in runs)
            ax.scatter(
                speed,
                top1,
                color=colors(labels.index(label)),
                marker="o" if weights == "fp32" else "^",
                s=50,
                label=f"{label} ({weights})",
            )
        ax.axvline(1.0, color="0.6", lw=1, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(times)
        ax.xaxis.set_minor_formatter(times)
        ax.set_xlabel(f"speed against dense, onnxruntime CPU, {batch}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (mean over seeds)")
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=["cifar10", "digits", "digits-wrn"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--replot", action="store_true")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        help="measure these rows only, replacing their seeds in the .json",
    )
    args = parser.parse_args()
    results = OUT / f"{args.dataset}.json"
    if args.replot:
        rows = json.loads(results.read_text())
    else:
        labels = args.rows or (WRN_ROWS if args.dataset == "digits-wrn" else list(ROWS))
        runs = [
            (label, seed)
            for label in labels
            for seed in (args.seeds[:1] if label in ONE_SEED else args.seeds)
        ]
        rows = [row for label, seed in runs for row in measure(args.dataset, label, seed)]
        if args.rows and results.exists():  # the other rows and seeds stay as measured before
            kept = [r for r in json.loads(results.read_text()) if (r["row"], r["seed"]) not in runs]
            rows = sorted(kept + rows, key=lambda r: (list(ROWS).index(r["row"]), r["weights"], r["seed"]))
        files.write_json(results, rows)
    files.write_text(OUT / f"{args.dataset}.md", table(rows))
    picture(rows, OUT / f"{args.dataset}-accuracy-vs-speed.png", f"{args.dataset}: accuracy against speed")
    print(table(rows))


if __name__ == "__main__":
    main()
