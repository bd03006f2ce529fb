"""Benchmark (c): WRN-28-2 training throughput on one GPU, side by side in one process.

  conventional   the loop peers' code uses: torchvision's CIFAR-10 dataset (uint8 arrays -> PIL
                 crop/flip/ToTensor/Normalize per image) through a DataLoader with workers, fp32,
                 dense model, plain SGD
  dense / dsr    dsrpipe's own epoch loop (`dsrpipe.train.train_one_epoch`): the split resident on
                 the GPU, augmentation as batched tensor ops, channels_last, fused SGD, bf16
                 autocast, optionally torch.compile with CUDA graphs; DSR at 0.9 with N_p 20,000
                 and a reallocation every 100 iterations (the paper's densest schedule)

Each variant runs whole epochs; dense and dsr alternate (rounds), so drift on the machine hits
both alike. Reports images/s (median over rounds) and the ratios.

    python bench/gpu_throughput.py --root .data/cifar10-jpg.tar.gz [--rounds 3] [--epochs 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from dsrpipe.data import load_data
from dsrpipe.models import create_model
from dsrpipe.sparse import DSR, Dense, RewireSchedule
from dsrpipe.train import compile_for_training, train_one_epoch


def dsrpipe_runner(train, method: str, *, bf16: bool, compile: bool, batch: int):
    torch.manual_seed(0)
    model = create_model("wrn-28-2", num_classes=10, in_channels=3, image_size=32).cuda()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True
    )
    sparsifier = (
        DSR(model, optimizer, sparsity=0.9, prune_target=20_000, schedule=RewireSchedule({0: 100}))
        if method == "dsr"
        else Dense(model, optimizer)
    )
    step_model = compile_for_training(model) if compile else model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    epoch = 0

    def run_epoch() -> tuple[int, float]:
        nonlocal epoch
        torch.cuda.synchronize()
        start = time.perf_counter()
        batches = train.batches(
            batch, shuffle=True, augment=True, seed=0, epoch=epoch, device="cuda", drop_last=True
        )
        totals = train_one_epoch(step_model, optimizer, sparsifier, batches, autocast)
        totals["loss_sum"].item()  # the epoch is done when its loss is
        epoch += 1
        return totals["seen"], time.perf_counter() - start, totals["reallocations"]

    return run_epoch


def conventional_runner(train, *, batch: int, workers: int):
    import torchvision
    from torchvision import transforms as T

    class CIFAR10(torchvision.datasets.CIFAR10):
        """torchvision's CIFAR-10 dataset class and __getitem__, holding our copy of the images
        (uint8 HWC arrays, as CIFAR10 keeps them) instead of reading its pickled batches."""

        def __init__(self, images, labels, transform):  # no super().__init__(): it would read files
            self.data, self.targets = images.permute(0, 2, 3, 1).numpy(), labels.tolist()
            self.transform, self.target_transform = transform, None

    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(train.info.mean, train.info.std),
        ]
    )
    loader = torch.utils.data.DataLoader(
        CIFAR10(train.images, train.labels, transform),
        batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=True,
        drop_last=True,
        persistent_workers=True,
    )
    torch.manual_seed(0)
    model = create_model("wrn-28-2", num_classes=10, in_channels=3, image_size=32).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def run_epoch() -> tuple[int, float]:
        torch.cuda.synchronize()
        start, seen = time.perf_counter(), 0
        model.train()
        for x, y in loader:
            x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(y)
        torch.cuda.synchronize()
        return seen, time.perf_counter() - start, 0

    return run_epoch


def check_syncs(args) -> None:
    """torch.cuda.set_sync_debug_mode reports every operation that waits for the GPU."""
    import warnings

    train, _ = load_data("imagefolder", root=args.root, cache_dir=args.cache_dir)
    run_epoch = dsrpipe_runner(train, "dsr", bf16=True, compile=False, batch=args.batch)
    run_epoch()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen, _, reallocations = run_epoch()
    torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    print(
        f"{len(syncs)} synchronising operations in {seen // args.batch} steps ({reallocations} reallocations)"
    )
    for where in sorted(set(syncs)):
        print(f"   {syncs.count(where)} x {where}")


def concurrent(args) -> None:
    """N trainings at once on the one GPU (as `dsrpipe compare --jobs N` runs them): the sum of
    their images/s, timed once all of them are past compilation."""
    import subprocess
    import sys
    import tempfile

    load_data("imagefolder", root=args.root, cache_dir=args.cache_dir)  # decode once, for all
    result = {}
    for n in map(int, args.concurrent.split(",")):
        ready = tempfile.mkdtemp(suffix=f"-{n}")
        outs = [tempfile.mktemp(suffix=".json") for _ in range(n)]
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--root",
                    args.root,
                    "--variants",
                    "compiled-dsr",
                    "--rounds",
                    str(args.rounds),
                    "--ready-dir",
                    ready,
                    "--json",
                    out,
                    *(["--cache-dir", args.cache_dir] if args.cache_dir else []),
                ],
                stdout=subprocess.DEVNULL,
                env={**__import__("os").environ, "OMP_NUM_THREADS": "2"},
            )
            for out in outs
        ]
        if any(child.wait() for child in children):
            raise SystemExit(f"a concurrent run failed (n={n})")
        rates = [json.load(open(out))["images_per_second"]["compiled-dsr"] for out in outs]
        result[n] = {"aggregate": sum(rates), "each": rates}
        print(
            f"{n} at once: {sum(rates):,.0f} img/s in all ({min(rates):,.0f}-{max(rates):,.0f} each)",
            flush=True,
        )
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=".data/cifar10-jpg.tar.gz", help="CIFAR-10 image folder or archive")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the conventional loop")
    parser.add_argument(
        "--variants", default="conventional,eager-dense,eager-dsr,compiled-dense,compiled-dsr"
    )
    parser.add_argument(
        "--concurrent",
        default=None,
        help="e.g. 1,2,4,8: aggregate img/s of that many compiled DSR trainings sharing the GPU",
    )
    parser.add_argument("--ready-dir", help=argparse.SUPPRESS)  # set for the children of --concurrent
    parser.add_argument(
        "--check-syncs",
        action="store_true",
        help="count host synchronisations per step of one eager DSR epoch, then exit",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.check_syncs:
        return check_syncs(args)
    if args.concurrent:
        return concurrent(args)

    train, _ = load_data("imagefolder", root=args.root, cache_dir=args.cache_dir)
    variants = args.variants.split(",")
    runners = {}
    for name in variants:
        if name == "conventional":
            runners[name] = conventional_runner(train, batch=args.batch, workers=args.workers)
        else:
            mode, method = name.split("-")
            runners[name] = dsrpipe_runner(
                train, method, bf16=True, compile=mode == "compiled", batch=args.batch
            )
    for name, run_epoch in runners.items():  # warm-up epoch: compilation, cuDNN autotuning, workers
        seen, seconds, _ = run_epoch()
        print(f"warm-up {name}: {seen / seconds:,.0f} img/s", flush=True)
    if args.ready_dir:  # start timing only once every concurrent process is warm
        import os
        import pathlib

        ready = pathlib.Path(args.ready_dir)
        (ready / str(os.getpid())).touch()
        while len(list(ready.iterdir())) < int(ready.name.split("-")[-1]):
            time.sleep(0.05)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, run_epoch in runners.items():
            seen, seconds, reallocations = run_epoch()
            rates[name].append(seen / seconds)
            print(
                f"round {r + 1} {name}: {seen / seconds:,.0f} img/s ({seconds:.2f} s/epoch, "
                f"{reallocations} reallocations)",
                flush=True,
            )
    median = {name: statistics.median(v) for name, v in rates.items()}
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch,
        "images_per_second": median,
        "all": rates,
    }
    for mode in ("eager", "compiled"):
        if f"{mode}-dense" in median and f"{mode}-dsr" in median:
            result[f"{mode}_dsr_overhead"] = median[f"{mode}-dense"] / median[f"{mode}-dsr"] - 1
        if "conventional" in median and f"{mode}-dsr" in median:
            result[f"{mode}_dsr_vs_conventional"] = median[f"{mode}-dsr"] / median["conventional"]
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
