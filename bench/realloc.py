"""Benchmark (a): one DSR reallocation step at 0.9 sparsity, WRN-28-2 (CIFAR-10) and ResNet-50
(ImageNet) shapes, with the paper's N_p, side by side with a host-side NumPy implementation in
the style of the authors' PyTorch 0.4 reference (weights copied to the host, random growth by the
2019-era idiom `np.random.choice(free, g, replace=False)`, which permutes every free position).

    python bench/realloc.py [--repeats 7] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from dsrpipe.models import create_model
from dsrpipe.sparse import DSR, LayerSelection

CASES = {
    # name: (model, classes, image size, N_p, sparsifier options as in the paper's runs)
    "wrn-28-2": ("wrn-28-2", 10, 32, 20_000, {}),
    "resnet50": (
        "resnet50",
        1000,
        224,
        400_000,
        {"layers": LayerSelection(dense_last=False)},
    ),  # downsample dense
}


def reference_style_reallocate(
    weights: list[torch.Tensor], masks: list[torch.Tensor], threshold: float, rng: np.random.RandomState
) -> int:
    """Algorithm 1 done on the host with NumPy, as the reference implementation did."""
    host_w = [w.detach().cpu().numpy().copy() for w in weights]
    host_m = [m.cpu().numpy().copy() for m in masks]
    pruned, kept = [], []
    for w, m in zip(host_w, host_m):
        below = m & (np.abs(w) < threshold)
        m &= ~below
        w[below] = 0
        pruned.append(int(below.sum()))
        kept.append(int(m.sum()))
    total = sum(pruned)
    grow = np.floor(total * np.array(kept) / sum(kept)).astype(int)
    grow[np.argmax(kept)] += total - grow.sum()
    for m, g in zip(host_m, grow):
        free = np.flatnonzero(~m)
        m.flat[rng.choice(free, size=g, replace=False)] = True
    for w, m, hw, hm in zip(weights, masks, host_w, host_m):
        w.data.copy_(torch.from_numpy(hw))
        m.copy_(torch.from_numpy(hm))
    return total


def perturb(sparsifier: DSR, generator: torch.Generator) -> None:
    """Stand-in for the training between reallocations: active weights move a little, so grown
    zeros become small weights and the threshold meets a realistic magnitude distribution."""
    with torch.no_grad():
        for name, mask in sparsifier.masks.items():
            w = sparsifier.weights[name]
            w.add_(torch.randn(w.shape, generator=generator, device=w.device) * 0.002 * mask)


def bench_case(name: str, repeats: int, device: str) -> dict:
    model_name, classes, size, prune_target, options = CASES[name]
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=classes, in_channels=3, image_size=size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dsr = DSR(model, optimizer, sparsity=0.9, prune_target=prune_target, **options)
    generator = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(8):  # let H adapt to the weights so each step prunes about N_p
        perturb(dsr, generator)
        dsr.reallocate()
    ours, baseline, pruned = [], [], []
    rng = np.random.RandomState(0)
    names = list(dsr.masks)
    for _ in range(repeats):  # alternate the two so machine noise hits both alike
        perturb(dsr, generator)
        sync()
        start = time.perf_counter()
        stats = dsr.reallocate()
        sync()
        ours.append(time.perf_counter() - start)
        pruned.append(stats["pruned"])
        perturb(dsr, generator)
        start = time.perf_counter()
        reference_style_reallocate(
            [dsr.weights[n] for n in names], [dsr.masks[n] for n in names], dsr.threshold, rng
        )
        baseline.append(time.perf_counter() - start)
    sparse_params = sum(w.numel() for w in dsr.weights.values())
    return {
        "case": name,
        "device": device,
        "sparse_params": sparse_params,
        "active": dsr.active_count(),
        "prune_target": prune_target,
        "pruned_median": int(statistics.median(pruned)),
        "dsrpipe_ms": 1000 * statistics.median(ours),
        "reference_style_ms": 1000 * statistics.median(baseline),
        "speedup": statistics.median(baseline) / statistics.median(ours),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(
        f"{'case':10} {'sparse params':>14} {'pruned/step':>12} {'dsrpipe':>10} {'reference-style':>16} {'speedup':>8}"
    )
    results = []
    for case in args.cases:
        r = bench_case(case, args.repeats, args.device)
        results.append(r)
        print(
            f"{r['case']:10} {r['sparse_params']:>14,} {r['pruned_median']:>12,} {r['dsrpipe_ms']:>8.1f}ms "
            f"{r['reference_style_ms']:>14.1f}ms {r['speedup']:>7.1f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
