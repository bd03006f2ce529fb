"""The deployment table: granularity × sparsity × {float32, int8} → top-1, file size and
onnxruntime latency against the dense model of the same architecture, measured by `validate`
(side by side, one process, see dsrpipe.deploy.validate).

Each row trains DSR once (`dsrpipe run` through the Python API), then exports and validates the
same trained model again with int8 weights. From the project root:

    python bench/deploy_table.py digits             # pipelines/quickstart.yaml, the embedded digits
    python bench/deploy_table.py cifar10-subset     # small-cnn on 3,000 CIFAR-10 training images, 10 epochs

Writes bench/results/deploy/<dataset>.{md,json}; the runs go to bench/results/deploy/runs/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsrpipe import files
from dsrpipe.config import load_pipeline
from dsrpipe.errors import ValidationFailed
from dsrpipe.pipeline import export_stage, run_pipeline, validate_stage

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "deploy"
ROWS = [("element", 0.9), ("kernel", 0.9), ("channel", 0.5), ("channel", 0.75)]
DATASETS = {
    "digits": [],  # the quickstart as it is
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
        "validate.min_top1=null",
    ],
}


def measure(dataset: str, granularity: str, sparsity: float) -> list[dict]:
    name = f"{dataset}-{granularity}-{sparsity:g}"
    overrides = [
        *DATASETS[dataset],
        f"name={name}",
        f"sparsity.granularity={granularity}",
        f"sparsity.sparsity={sparsity}",
        # N_p as the quickstart's share (600 of ~8k active weights at 0.9), at any sparsity
        "sparsity.prune_target=null",
        "sparsity.prune_fraction=0.08",
        "validate.min_top1=null",
    ]
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
        rows.append(
            {
                "granularity": granularity,
                "sparsity": sparsity,
                "weights": "int8" if quantize == "int8" else "fp32",
                **{
                    k: report.get(k)
                    for k in (
                        "onnx_top1",
                        "fp32_onnx_top1",
                        "int8_agreement",
                        "nonzero_params",
                        "total_params",
                        "onnx_bytes",
                        "dense_onnx_bytes",
                        "size_ratio",
                        "speedup",
                        "latency_ms",
                        "throughput",
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
        "| granularity | sparsity | weights | top-1 | non-zero params | file bytes | size ratio | "
        "p50 speedup (batch 1) | throughput ratio (batch 64) | params after shrinking | validate gates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = r["speedup"] or {}
        shrunk = (r["shrink"] or {}).get("params_after")
        lines.append(
            f"| {r['granularity']} | {r['sparsity']:g} | {r['weights']} | {r['onnx_top1']:.4f} | "
            f"{r['nonzero_params']:,} | {r['onnx_bytes']:,} | {r['size_ratio']:.3f} | "
            f"{speedup.get('latency_p50', float('nan')):.2f}× | "
            f"{speedup.get('throughput', float('nan')):.2f}× | "
            f"{f'{shrunk:,}' if shrunk else 'not shrunk'} of {r['total_params']:,} | "
            f"{'pass' if r['passed'] else 'fail: ' + _reason(r['failure'])} |"
        )
    return "\n".join(lines) + "\n"


def _reason(failure: str) -> str:
    """The gates a run missed, without the file path the message starts with."""
    return failure.split(": ", 1)[-1].replace("|", "/")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    args = parser.parse_args()
    rows = [row for granularity, sparsity in ROWS for row in measure(args.dataset, granularity, sparsity)]
    files.write_json(OUT / f"{args.dataset}.json", rows)
    files.write_text(OUT / f"{args.dataset}.md", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
