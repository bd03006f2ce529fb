"""The training loop's parts, below the stages that run it (dsrpipe.train): one epoch of SGD steps
with the sparsifier's, evaluation, the progress bar, what an epoch's record adds up (MACs × images,
shrinks, peak memory), and every RNG's state for a checkpoint to resume bit for bit.
"""

from __future__ import annotations

import random
import resource
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import distributed
from .data import Dataset
from .sparse import Sparsifier


def compile_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile for the training steps (static shapes: batches drop the last partial one).
    On CUDA it also replays the steps as CUDA graphs, which takes the per-kernel launch cost off
    the host: a small CNN otherwise spends more time launching kernels than running them.
    Evaluation keeps the eager model, which shares the weights, so no eval-mode graph is built."""
    cuda = next(model.parameters()).is_cuda
    return torch.compile(model, mode="reduce-overhead" if cuda else None)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier,
    batches,
    autocast: Callable = nullcontext,
    on_step: Callable[[], None] = lambda: None,
    on_reallocation: Callable[[], None] = lambda: None,
    on_shrink: Callable[[dict[str, Any]], torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """One pass over `batches`: SGD steps, each followed by the sparsifier's step (and
    `on_reallocation` after each reallocation). When the sparsifier shrinks the model,
    `on_shrink(event)` gives the module to step with from then on (a shrink replaces the
    parameters that wrappers such as DDP or torch.compile hold). Totals stay on the device, so
    nothing waits for the GPU until the caller reads them; `warnings` are lines for the log (a
    channel removal that ended short of its share)."""
    model.train()
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, pruned, reallocations, switched_off, pruned_grown = 0, 0, 0, 0, 0
    warnings = []
    for x, y in batches:
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays (if compiled)
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = sparsifier.step()
        if stats is not None:
            on_reallocation()
            if stats.get("shrunk"):
                if on_shrink is None:
                    raise ValueError("the sparsifier shrank the model: train_one_epoch needs on_shrink")
                model = on_shrink(stats["shrunk"])
            pruned += stats["pruned"]
            reallocations += 1
            switched_off += stats.get("switched_off", 0)
            pruned_grown += stats.get("pruned_grown", 0)
            if stats.get("short_of_share"):
                warnings.append(stats["short_of_share"])
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        on_step()
    return {
        "loss_sum": loss_sum,
        "correct": correct,
        "seen": seen,
        "pruned": pruned,
        "reallocations": reallocations,
        "switched_off": switched_off,
        "pruned_grown": pruned_grown,
        "warnings": warnings,
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    autocast: Callable = nullcontext,
    batch_size: int = 512,
) -> tuple[float, float, int]:
    """Mean cross-entropy, top-1 accuracy and the count of samples with a NaN or infinite logit on
    a split, without augmentation; under torchrun each rank holds its part of the split, and the
    sums are reduced over the ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    for x, y in dataset.batches(batch_size, shuffle=False, augment=False, seed=0, epoch=0, device=device):
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        nonfinite += (~torch.isfinite(logits)).any(1).sum()
    count = len(dataset)
    if distributed.active():
        loss_sum, correct, nonfinite, count = distributed.all_sum(loss_sum, correct, nonfinite, count)
        count = count.item()
    return loss_sum.item() / count, correct.item() / count, int(nonfinite.item())


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """The process's peak resident memory so far, and on a GPU the peak CUDA memory, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": rss, "peak_cuda_bytes": cuda}


def progress_bar(enabled: bool, console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def mac_images(macs: int, shrinks: list[dict], steps: int, last_iteration: int, seen: int) -> int:
    """MACs × images over an epoch of `steps` equal batches ending at `last_iteration`, the model
    costing `macs` per sample at first and what each shrink left after the step it came in."""
    per_step = seen // steps
    total, iteration = 0, last_iteration - steps
    for event in shrinks:
        total += macs * per_step * (event["iteration"] - iteration)
        macs, iteration = event["macs_after"], event["iteration"]
    return total + macs * per_step * (last_iteration - iteration)


def shrink_line(event: dict[str, Any]) -> str:
    """One shrink, for the log."""
    return (
        f"shrunk at iteration {event['iteration']}: params {event['params_before']:,} → "
        f"{event['params_after']:,}, MACs {event['macs_before']:,} → {event['macs_after']:,}"
    )


def sparsity_record(sparsifier: Sparsifier, totals: dict[str, Any]) -> dict[str, Any]:
    """What the sparsifier did in the epoch, and where it stands."""
    regrows = sparsifier.tracks_regrowth
    switched_off, pruned_grown = totals["switched_off"], totals["pruned_grown"]
    return {
        "threshold": getattr(sparsifier, "threshold", None),
        "pruned": totals["pruned"],
        "reallocations": totals["reallocations"],
        "active_params": sparsifier.active_count(),
        # Of the weights reallocation switched off, the share it had grown at the one before.
        "pruned_grown": pruned_grown if regrows else None,
        "pruned_grown_share": pruned_grown / switched_off if regrows and switched_off else None,
        "layer_density": sparsifier.layer_density(),
        # Channel removal: the live channels of each channel group, by its first writing layer.
        "channels_alive": sparsifier.channels.alive_counts() if sparsifier.channels is not None else None,
    }


def epoch_line(h: dict[str, Any], stage: str, epochs: int, sparsifier: Sparsifier) -> str:
    """An epoch's record `h`, for the log."""
    line = (
        f"{stage} epoch {h['epoch']}/{epochs}  loss {h['train_loss']:.4f}  "
        f"test top-1 {h['test_top1']:.4f}  {h['images_per_second']:,.0f} img/s"
    )
    if h["reallocations"]:
        if h["threshold"] is not None:
            line += f"  H {sparsifier.threshold:.3g}"
        line += f"  pruned {h['pruned']}"
    if h.get("channels_alive"):
        line += f"  channels {sum(h['channels_alive'].values())}/{sparsifier.channels.total}"
    return line


def step_callback(on_step: Callable[[], None], epoch: int, steps: int) -> Callable[[], None]:
    """`on_step`, and the test-only fault: this rank dies halfway through this epoch (see
    dsrpipe.distributed)."""
    die_at = distributed.fault_exit_step(epoch, steps)
    if die_at is None:
        return on_step
    done = 0

    def step():
        nonlocal done
        on_step()
        done += 1
        if done > die_at:
            distributed.die()

    return step


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and numbers: nothing a checkpoint reader must unpickle."""
    version, python, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(python, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
