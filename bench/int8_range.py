"""What portable int8 (7-bit weights, export.int8_range: portable) costs against full-range int8
on this machine: top-1, agreement with float32 ONNX, and latency side by side (docs/int8.md).

For each seed the quickstart (pipelines/quickstart.yaml, export.quantize=int8) is trained once;
the same trained model is then exported and validated twice, portable and full, and the two
int8 files (and the float32 one) are timed in one process, taking turns run by run. From the
project root:

    python bench/int8_range.py                                   # digits, seeds 0 1 2
    python bench/int8_range.py cifar10-subset --seeds 0 1        # deploy_table's CIFAR subset

Writes bench/results/int8_range/<dataset>.{md,json}; the runs go to bench/results/int8_range/runs/.
Besides top-1 (a test split of 360 digits moves in steps of 0.28 points), it reports how far
each int8 model's logits are from float32's on the test split: the precision the 8th bit buys.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dsrpipe import files
from dsrpipe.config import load_pipeline
from dsrpipe.deploy.validate import _timings
from dsrpipe.errors import ValidationFailed
from dsrpipe.machine import cpu_features
from dsrpipe.pipeline import export_stage, run_pipeline, validate_stage
from dsrpipe.train import load_splits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_table import DATASETS  # noqa: E402  (the same settings as the deployment table)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "int8_range"
RANGES = ("portable", "full")
KEYS = ("onnx_top1", "fp32_onnx_top1", "int8_agreement", "int8_top1_drop", "onnx_bytes", "passed")


def measure(dataset: str, seed: int, latency_runs: int, throughput_runs: int) -> dict:
    name = f"{dataset}-seed{seed}"
    run_dir = OUT / "runs" / name
    row: dict = {"seed": seed}
    for int8_range in RANGES:
        cfg = load_pipeline(
            ROOT / "pipelines" / "quickstart.yaml",
            [
                *DATASETS[dataset],
                f"name={name}",
                f"seed={seed}",
                "export.quantize=int8",
                f"export.int8_range={int8_range}",
            ],
        )
        try:
            if int8_range == "portable":  # trains (or finds the trained run), exports, validates
                report = run_pipeline(cfg, OUT / "runs", progress=False)
            else:  # the same trained model, exported again with full-range weights
                export_stage(cfg, OUT / "runs", force=True)
                report = validate_stage(cfg, OUT / "runs", force=True)
        except ValidationFailed as failed:  # a missed gate is a result too
            report = failed.report
        shutil.copyfile(run_dir / "model.onnx", run_dir / f"{int8_range}.onnx")
        row[int8_range] = {k: getattr(report, k) for k in KEYS}
        row[int8_range]["int8_range"] = report.int8_range
    row["cpu"], row["onnxruntime"] = report.cpu, report.onnxruntime
    pixels = test_pixels(cfg)
    row["logit_error"] = logit_error(run_dir, pixels)
    row["timing"] = side_by_side(run_dir, pixels, latency_runs, throughput_runs)
    return row


MODELS = {"portable": "portable.onnx", "full": "full.onnx", "fp32": "model.fp32.onnx"}


def test_pixels(cfg) -> np.ndarray:
    _, test_set = load_splits(cfg.data)
    batches = test_set.batches(256, shuffle=False, augment=False, seed=0, epoch=0, normalize=False)
    return np.concatenate([x.cpu().numpy().astype(np.float32) for x, _ in batches])


def logit_error(run_dir: Path, pixels: np.ndarray) -> dict:
    """|int8 logit - float32 logit| over the test split, relative to float32's logit spread (std)."""
    logits = {
        m: ort.InferenceSession(str(run_dir / f), providers=["CPUExecutionProvider"]).run(
            None, {"pixels": pixels}
        )[0]
        for m, f in MODELS.items()
    }
    spread = float(logits["fp32"].std())
    return {
        m: {
            "mean_abs": float(np.abs(logits[m] - logits["fp32"]).mean()),
            "max_abs": float(np.abs(logits[m] - logits["fp32"]).max()),
            "relative_rms": float(np.sqrt(((logits[m] - logits["fp32"]) ** 2).mean()) / spread),
        }
        for m in ("portable", "full")
    }


def side_by_side(run_dir: Path, pixels: np.ndarray, latency_runs: int, throughput_runs: int) -> dict:
    """p50 ms at batch 1 and batch 64 of portable, full and float32, in alternation, on 1 thread
    and on onnxruntime's default threads."""
    models = MODELS
    result = {}
    for threads in (1, None):
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        sessions = [
            ort.InferenceSession(str(run_dir / f), options, providers=["CPUExecutionProvider"])
            for f in models.values()
        ]
        for batch, runs in ((1, latency_runs), (64, throughput_runs)):
            seconds = _timings(sessions, pixels[:batch], runs)
            key = f"threads={threads or 'default'} batch={batch}"
            result[key] = {m: float(np.median(s) * 1000) for m, s in zip(models, seconds)}
    return result


def markdown(dataset: str, rows: list[dict]) -> str:
    cpu = rows[0]["cpu"] or {}
    flags = cpu.get("flags") or {}
    lines = [
        f"# int8 weight range: portable (7-bit) against full (8-bit), {dataset}",
        "",
        f"CPU: {cpu.get('model_name')} ({cpu.get('machine')}); "
        + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items())
        + f"; onnxruntime {(rows[0]['onnxruntime'] or {}).get('version')}.",
        "",
        "| seed | fp32 ONNX top-1 | portable top-1 | full top-1 | portable agreement | full agreement "
        "| portable logit RMS err | full logit RMS err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, f, e = r["portable"], r["full"], r["logit_error"]
        lines.append(
            f"| {r['seed']} | {p['fp32_onnx_top1']:.4f} | {p['onnx_top1']:.4f} | {f['onnx_top1']:.4f} "
            f"| {p['int8_agreement']:.4f} | {f['int8_agreement']:.4f} "
            f"| {e['portable']['relative_rms']:.4f} | {e['full']['relative_rms']:.4f} |"
        )

    def mean(model, key):
        values = [r[model][key] for r in rows]
        return f"{np.mean(values):.4f} ± {np.std(values):.4f}"

    def err(model):
        return f"{np.mean([r['logit_error'][model]['relative_rms'] for r in rows]):.4f}"

    lines.append(
        f"| mean ± std | {mean('portable', 'fp32_onnx_top1')} | {mean('portable', 'onnx_top1')} "
        f"| {mean('full', 'onnx_top1')} | {mean('portable', 'int8_agreement')} | {mean('full', 'int8_agreement')} "
        f"| {err('portable')} | {err('full')} |"
    )
    lines += [
        "",
        "Logit RMS err: RMS of (int8 − float32 logits) over the test split, over the float32 logits' std.",
        "",
        "p50 ms (median over seeds; the three models timed side by side, in alternation):",
        "",
        "| setting | portable | full | fp32 |",
        "|---|---|---|---|",
    ]
    for key in rows[0]["timing"]:
        med = {m: np.median([r["timing"][key][m] for r in rows]) for m in MODELS}
        lines.append(f"| {key} | {med['portable']:.4f} | {med['full']:.4f} | {med['fp32']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default="digits", choices=sorted(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--latency-runs", type=int, default=500)
    parser.add_argument("--throughput-runs", type=int, default=100)
    args = parser.parse_args()
    rows = [measure(args.dataset, seed, args.latency_runs, args.throughput_runs) for seed in args.seeds]
    OUT.mkdir(parents=True, exist_ok=True)
    files.write_json(OUT / f"{args.dataset}.json", {"cpu_now": cpu_features(), "rows": rows})
    files.write_text(OUT / f"{args.dataset}.md", markdown(args.dataset, rows))
    print(markdown(args.dataset, rows))


if __name__ == "__main__":
    main()
