"""Benchmark (b): training-step time of a DSR model against the same model trained dense,
measured side by side in one run (steps alternate, so machine noise hits both alike).

The DSR figure includes everything DSR adds: gradient masking on every step, and one
reallocation every `--period` steps (the paper's densest schedule is every 100 iterations),
amortised over the period.

    python bench/step_overhead.py [--model wrn-28-2] [--batch 64] [--steps 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dsrpipe.models import create_model
from dsrpipe.sparse import DSR, RewireSchedule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="wrn-28-2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--period", type=int, default=100)
    parser.add_argument("--prune-target", type=int, default=20_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def setup(sparse: bool):
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=10, in_channels=3, image_size=32).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        dsr = (
            DSR(model, opt, sparsity=0.9, prune_target=args.prune_target, schedule=RewireSchedule({0: 10**9}))
            if sparse
            else None
        )
        return model, opt, dsr

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(10, (args.batch,), generator=gen).to(device)
    runs = {"dense": setup(False), "dsr": setup(True)}

    def step(model, opt, dsr):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dsr is not None:
            dsr.step()
        sync()
        return time.perf_counter() - start

    times = {"dense": [], "dsr": []}
    for i in range(args.steps + 3):
        for name in ("dense", "dsr") if i % 2 else ("dsr", "dense"):
            elapsed = step(*runs[name])
            if i >= 3:  # warm-up steps are not timed
                times[name].append(elapsed)
    dsr = runs["dsr"][2]
    realloc = []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        dsr.reallocate()
        sync()
        realloc.append(time.perf_counter() - start)

    dense_step = statistics.median(times["dense"])
    dsr_step = statistics.median(times["dsr"])
    realloc_s = statistics.median(realloc)
    dsr_total = dsr_step + realloc_s / args.period
    result = {
        "model": args.model,
        "batch": args.batch,
        "device": str(device),
        "bf16": args.bf16,
        "dense_step_ms": 1000 * dense_step,
        "dsr_step_ms": 1000 * dsr_step,
        "reallocation_ms": 1000 * realloc_s,
        "period": args.period,
        "dsr_step_with_reallocation_ms": 1000 * dsr_total,
        "overhead": dsr_total / dense_step - 1,
        "images_per_second_dense": args.batch / dense_step,
        "images_per_second_dsr": args.batch / dsr_total,
    }
    print(
        f"{args.model} batch {args.batch} on {device}{' bf16' if args.bf16 else ''}: "
        f"dense {result['dense_step_ms']:.1f} ms/step, DSR {result['dsr_step_ms']:.1f} ms/step "
        f"+ reallocation {result['reallocation_ms']:.1f} ms every {args.period} steps "
        f"= {result['dsr_step_with_reallocation_ms']:.1f} ms → overhead {100 * result['overhead']:+.2f}%"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
