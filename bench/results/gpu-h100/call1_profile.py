"""The first look at the CUDA path (call 1, code of commit aaba83e): where a WRN-28-2 training
step spends its time. Kept for the record, its conventional-loop section abridged (it was the
loop bench/gpu_throughput.py's `conventional_runner` runs); bench/gpu_throughput.py replaced it."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from dsrpipe.data import load_data
from dsrpipe.models import create_model
from dsrpipe.sparse import DSR, RewireSchedule


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", default=".data/cifar10-jpg.tar.gz")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args()
    dev = torch.device("cuda")
    t = time.perf_counter()
    train, test = load_data("imagefolder", root=args.root, cache_dir="/tmp/dsrcache")
    print(f"load {time.perf_counter() - t:.1f}s train {len(train)} test {len(test)}", flush=True)
    results = {}

    def run(method, bf16, cl, presliced, steps=args.steps, profile=False):
        torch.manual_seed(0)
        model = create_model("wrn-28-2", num_classes=10, in_channels=3, image_size=32).to(dev)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sp = DSR(model, opt, sparsity=0.9, prune_target=20000, schedule=RewireSchedule({0: 100})) if method == "dsr" else None
        batches = train.batches(128, shuffle=True, augment=True, seed=0, epoch=0, device=dev, drop_last=True)
        if presliced:
            batches = list(batches)[: steps + 30]
        it = iter(batches)

        def step():
            x, y = next(it)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sp is not None:
                sp.step()
        for _ in range(30):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        if profile:
            from torch.profiler import ProfilerActivity, profile as prof
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
                for _ in range(50):
                    step()
                torch.cuda.synchronize()
            table = pr.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
            print(table, flush=True)
            return
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        key = f"{method} bf16={bf16} cl={cl} presliced={presliced}"
        results[key] = steps * 128 / dt
        print(f"{key}: {results[key]:,.0f} img/s ({dt / steps * 1000:.2f} ms/step)", flush=True)

    for method in ("dense", "dsr"):
        for bf16 in (False, True):
            for cl in (False, True):
                run(method, bf16, cl, presliced=False)
    for cl in (False, True):
        run("dsr", True, cl, presliced=True)
        run("dense", True, cl, presliced=True)
    run("dsr", True, True, presliced=False, profile=True)
    run("dsr", True, True, presliced=True, profile=True)
    # The conventional loop: as bench/gpu_throughput.py's (torchvision CIFAR10-style dataset, PIL
    # transforms, DataLoader with 8 workers, fp32), timed over 150 steps after 30.
    with open(f"{args.out}/profile.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
