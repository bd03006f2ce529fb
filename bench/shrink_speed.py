"""Shrinking at export: how much smaller and faster a channel-sparse model gets in onnxruntime.

For small-cnn (8x8 digits) and WRN-10-2 (32x32 CIFAR-10 shapes), a given share of the filters of
every sparse layer (dsrpipe's default selection) is zeroed at random, after BatchNorm statistics
were trained on random data; the model is exported twice, as is (dense) and shrunk, and both
files are timed with onnxruntime on CPU, interleaved, at batch 1 and batch 64.

    python bench/shrink_speed.py [--runs 300] [--threads 2] [--dead-bn trained|zero] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from dsrpipe.deploy.export import export_onnx
from dsrpipe.deploy.shrink import shrink_model
from dsrpipe.models import create_model
from dsrpipe.sparse import LayerSelection

CASES = {  # name: (model, in_channels, image size)
    "small-cnn": ("small-cnn", 1, 8),
    "wrn-10-2": ("wrn-10-2", 3, 32),
}
BATCH_RUNS_DIVISOR = 10  # batch 64 takes far longer per run: fewer runs


def silence_dead_channels(model: nn.Module, example: torch.Tensor) -> None:
    """Set the BN shift of every channel whose BN input is constantly 0 so that ReLU makes it 0,
    as a trainer that masked the BN parameters along with the filter would leave it."""
    dead = {}

    def record(bn, args, _output):
        dead[bn] = args[0].eq(0).all(0).flatten(1).all(1)

    hooks = [bn.register_forward_hook(record) for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)]
    with torch.no_grad():
        model(example)
        for hook in hooks:
            hook.remove()
        for bn, channels in dead.items():
            scale = bn.weight[channels] / torch.sqrt(bn.running_var[channels] + bn.eps)
            bn.bias[channels] = scale * bn.running_mean[channels] - 1.0


def channel_sparse_model(
    name: str, in_channels: int, size: int, dead_share: float, seed: int, silence: bool
) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=in_channels, image_size=size)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(5):
            model(torch.randn(32, in_channels, size, size))
        for weight in LayerSelection().select(model).values():
            rows = torch.randperm(weight.shape[0])[: round(dead_share * weight.shape[0])]
            weight[rows] = 0
    model.eval()
    if silence:
        silence_dead_channels(model, torch.randn(4, in_channels, size, size))
    return model


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_ms(sessions: dict[str, ort.InferenceSession], x: np.ndarray, runs: int) -> dict[str, dict]:
    """min/p50/p95 latency per session; the sessions take turns, in alternating order, so that load
    from other processes falls on both alike (and the minimum is the least disturbed by it)."""
    for s in sessions.values():
        for _ in range(5):
            s.run(None, {"pixels": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for run in range(runs):
        for key in order if run % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            sessions[key].run(None, {"pixels": x})
            times[key].append((time.perf_counter() - start) * 1e3)
    return {
        k: {"min": min(t), "p50": statistics.median(t), "p95": float(np.percentile(t, 95))}
        for k, t in times.items()
    }


def measure(case: str, dead_share: float, runs: int, threads: int, folder: Path, silence: bool) -> dict:
    name, channels, size = CASES[case]
    model = channel_sparse_model(name, channels, size, dead_share, seed=0, silence=silence)
    shrunk, summary = shrink_model(model, (channels, size, size))
    paths = {}
    for key, variant in (("dense", model), ("shrunk", shrunk)):
        paths[key] = folder / f"{case}-{dead_share}-{key}.onnx"
        export_onnx(
            variant,
            paths[key],
            in_channels=channels,
            image_size=size,
            mean=[0.5] * channels,
            std=[0.25] * channels,
            metadata={},
            encoding="dense",
        )
    sessions = {key: session(path, threads) for key, path in paths.items()}
    rng = np.random.default_rng(0)
    result = {
        "case": case,
        "dead_share": dead_share,
        **{k: v for k, v in summary.items() if k != "removed_channels"},
        "bytes": {k: p.stat().st_size for k, p in paths.items()},
    }
    for batch, batch_runs in ((1, runs), (64, max(10, runs // BATCH_RUNS_DIVISOR))):
        x = rng.random((batch, channels, size, size), dtype=np.float32)
        outputs = {k: s.run(None, {"pixels": x})[0] for k, s in sessions.items()}
        result[f"max_abs_diff_b{batch}"] = float(np.abs(outputs["dense"] - outputs["shrunk"]).max())
        latency = interleaved_ms(sessions, x, batch_runs)
        result[f"latency_ms_b{batch}"] = latency
        result[f"speedup_b{batch}"] = {
            stat: latency["dense"][stat] / latency["shrunk"][stat] for stat in ("min", "p50")
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="timed runs at batch 1 (a tenth at batch 64)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--dead-bn",
        choices=("trained", "zero"),
        default="trained",
        help="what BN makes of a dead channel: its trained constant (often positive, so a padded "
        "consumer keeps one merged channel), or a constant that ReLU turns into 0",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for case in CASES:
            for dead_share in (0.5, 0.75):
                r = measure(case, dead_share, args.runs, args.threads, Path(folder), args.dead_bn == "zero")
                r["dead_bn"] = args.dead_bn
                results.append(r)
                print(
                    f"{case:9} dead {dead_share:.2f}: params {r['params_before']:,} -> {r['params_after']:,} "
                    f"({r['params_after'] / r['params_before']:.2f}x), MACs {r['macs_before']:,} -> "
                    f"{r['macs_after']:,} ({r['macs_after'] / r['macs_before']:.2f}x); "
                    f"b1 p50 {r['latency_ms_b1']['dense']['p50']:.3f} -> {r['latency_ms_b1']['shrunk']['p50']:.3f} ms "
                    f"({r['speedup_b1']['p50']:.2f}x, min {r['speedup_b1']['min']:.2f}x); b64 p50 "
                    f"{r['latency_ms_b64']['dense']['p50']:.2f} -> {r['latency_ms_b64']['shrunk']['p50']:.2f} ms "
                    f"({r['speedup_b64']['p50']:.2f}x, min {r['speedup_b64']['min']:.2f}x); "
                    f"max |dlogit| {max(r['max_abs_diff_b1'], r['max_abs_diff_b64']):.1e}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
