"""Stages `train-sparse` and `finetune`: one training recipe, readable top to bottom.

Each stage writes, under `<out>/<name>/<stage>/`:
  last.pt        checkpoint after every epoch (model, masks, optimizer, LR schedule, sparsifier
                 state, RNG states, metrics so far): `resume` continues bit for bit on CPU;
  final.pt       the same once the stage is complete; later stages read it;
  metrics.jsonl  one JSON line per epoch.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import files
from .config import FINETUNE_SETTINGS, TRAIN_SETTINGS, OptimConfig, Pipeline
from .data import Dataset
from .errors import UserError
from .models import create_model
from .sparse import Sparsifier
from .sparse.base import read_finished_run
from .sparse.frozen import initial_weights
from .sparse.thin import thin_model_options

console = Console(stderr=True, highlight=False, soft_wrap=True)


def log(cfg: Pipeline, message: str) -> None:
    console.print(f"{cfg.name} | {message}", markup=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{name}' requested but CUDA is not available here")
    return torch.device(name)


def stage_paths(out: Path, cfg: Pipeline, stage: str) -> dict[str, Path]:
    folder = Path(out) / cfg.name / stage
    return {"dir": folder, "last": folder / "last.pt", "final": folder / "final.pt",
            "metrics": folder / "metrics.jsonl"}


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None


def build_model(spec: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    return create_model(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                        image_size=spec["image_size"], **spec["options"]).to(device)


def train_sparse(cfg: Pipeline, out: Path, *, resume: bool = False, force: bool = False,
                 progress: bool = True) -> Path:
    """Train from scratch with the configured sparse method (DSR by default); returns final.pt."""

    s = cfg.sparsity

    def make_sparsifier(model, optimizer, steps_per_epoch):
        return s.create(model, optimizer, seed=cfg.seed, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs)

    def thin_spec(spec):  # thin-dense: a narrower dense model with the sparse model's parameter count
        options, params, budget = thin_model_options(
            spec["name"], spec["options"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
            image_size=spec["image_size"], sparsity=s.sparsity, layers=s.layers)
        log(cfg, f"thin-dense: {options} gives {params:,} parameters for a budget of {budget:,} "
                 f"({params / budget - 1:+.1%})")
        return {**spec, "options": options, "thin_dense": {"params": params, "budget": budget}}

    return _fit(cfg, "train", cfg.train, out, make_sparsifier, train_fingerprint(cfg), start_from=None,
                adapt_spec=thin_spec if s.method == "thin-dense" else None,
                resume=resume, force=force, progress=progress)


def train_fingerprint(cfg: Pipeline) -> str:
    """What a trained checkpoint must match: the training settings and, for a method that starts
    from another run (frozen's masks, prune's dense weights), that very run (retraining it makes
    this one stale)."""
    fingerprint = cfg.fingerprint(*TRAIN_SETTINGS)
    if cfg.sparsity.source is not None:
        option, path = cfg.sparsity.source
        fingerprint += f"-{read_finished_run(path, option).get('run_id')}"
    return fingerprint


def finetune(cfg: Pipeline, out: Path, *, resume: bool = False, force: bool = False,
             progress: bool = True) -> Path:
    """Continue from the trained model with its masks frozen, at a low learning rate."""
    trained_path = stage_paths(out, cfg, "train")["final"]
    if not trained_path.exists():
        raise UserError(f"no trained model at {trained_path}: run train-sparse first")
    trained = load_checkpoint(trained_path)
    if trained["fingerprint"] != train_fingerprint(cfg):
        raise UserError(f"{trained_path} was trained with other settings: rerun train-sparse (--force)")

    def make_sparsifier(model, optimizer, steps_per_epoch):
        masks = trained["sparsifier"]["masks"]
        s = cfg.sparsity
        frozen = Sparsifier(model, optimizer, sparsity=s.sparsity if masks else 0.0, layers=s.layers)
        frozen.load_masks(masks)
        return frozen

    # Tied to this very trained model too, so retraining makes the old fine-tuned one stale.
    fingerprint = f"{cfg.fingerprint(*FINETUNE_SETTINGS)}-{trained['run_id']}"
    return _fit(cfg, "finetune", cfg.finetune, out, make_sparsifier, fingerprint,
                start_from=trained, adapt_spec=lambda spec: trained["model_spec"],  # the model as trained
                resume=resume, force=force, progress=progress)


def _fit(cfg: Pipeline, stage: str, opt_cfg: OptimConfig, out: Path,
         make_sparsifier: Callable[..., Sparsifier], fingerprint: str, *, start_from: dict | None,
         resume: bool, force: bool, progress: bool, adapt_spec: Callable[[dict], dict] | None = None) -> Path:
    paths = stage_paths(out, cfg, stage)
    if paths["final"].exists() and not force:
        if load_checkpoint(paths["final"])["fingerprint"] == fingerprint:
            log(cfg, f"{stage}: already complete ({paths['final']})")
            return paths["final"]
        raise UserError(f"{paths['dir']} holds a {stage} run with other settings: use --force to redo it")
    checkpoint = None
    if paths["last"].exists() and not force:
        if not resume:
            raise UserError(f"{paths['last']} holds an unfinished {stage} run: "
                            "use --resume to continue it or --force to start over")
        checkpoint = load_checkpoint(paths["last"])
        if checkpoint["fingerprint"] != fingerprint:
            raise UserError(f"{paths['last']} was made with other settings: use --force to start over")

    device = resolve_device(cfg.device)
    train_set, test_set = cfg.data.load()
    info = train_set.info
    steps_per_epoch = train_set.num_batches(opt_cfg.batch_size, drop_last=True)
    if steps_per_epoch == 0:
        raise UserError(f"{stage}.batch_size {opt_cfg.batch_size} exceeds the {len(train_set)} training images")

    torch.manual_seed(cfg.seed)
    spec = {"name": cfg.model.name, "options": cfg.model.options, "num_classes": info.num_classes,
            "in_channels": info.in_channels, "image_size": info.image_size}
    if adapt_spec is not None:  # a model other than the configured one (thin-dense; finetune's trained one)
        spec = adapt_spec(spec)
    model = build_model(spec, device)
    init = initial_weights(model, cfg.seed)  # so that a frozen run can start where this one started
    optimizer = torch.optim.SGD(model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum,
                                nesterov=opt_cfg.nesterov and opt_cfg.momentum > 0,
                                weight_decay=opt_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, opt_cfg.milestones, opt_cfg.gamma)
    sparsifier = make_sparsifier(model, optimizer, steps_per_epoch)
    if start_from is not None:  # after the sparsifier: its initial random mask would zero trained weights
        model.load_state_dict(start_from["model"])
    history: list[dict[str, Any]] = []
    run_id = uuid.uuid4().hex
    if checkpoint is not None:
        run_id = checkpoint["run_id"]
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        sparsifier.load_state_dict(checkpoint["sparsifier"])
        _set_rng_state(checkpoint["rng"])
        history = checkpoint["history"]
        log(cfg, f"{stage}: resuming after epoch {len(history)}")

    use_bf16 = cfg.bf16 and device.type == "cuda"
    if cfg.bf16 and not use_bf16:
        log(cfg, "bf16 autocast applies on CUDA only; training in float32")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    batches_seed = cfg.seed + (1000 if stage == "finetune" else 0)  # a fresh data order per stage

    def save(path: Path, complete: bool) -> None:
        files.torch_save(path, {
            "stage": stage, "complete": complete, "fingerprint": fingerprint, "run_id": run_id,
            "epoch": len(history),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "sparsifier": sparsifier.state_dict(),
            "method": sparsifier.method, "rng": _rng_state(), "history": history,
            "model_spec": spec, "init": init, "data_info": asdict(info), "config": cfg.model_dump(mode="json"),
        })
        files.write_text(paths["metrics"], "".join(json.dumps(h) + "\n" for h in history))

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, disable=not progress, transient=True)
    with bar:
        for epoch in range(len(history), opt_cfg.epochs):
            task = bar.add_task(f"{cfg.name} | {stage} {epoch + 1}/{opt_cfg.epochs}",
                                total=steps_per_epoch)
            started = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen, pruned, reallocations = 0, 0, 0
            switched_off, pruned_grown = 0, 0
            lr = optimizer.param_groups[0]["lr"]
            for x, y in train_set.batches(opt_cfg.batch_size, shuffle=True, augment=cfg.data.augment,
                                          seed=batches_seed, epoch=epoch, device=device, drop_last=True):
                with autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats = sparsifier.step()
                if stats is not None:
                    pruned += stats["pruned"]
                    reallocations += 1
                    switched_off += stats.get("switched_off", 0)
                    pruned_grown += stats.get("pruned_grown", 0)
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                bar.advance(task)
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):  # keep last.pt of the last sound epoch; stop wasting time
                raise UserError(f"{stage} diverged: the training loss is {train_loss} in epoch {epoch + 1}; "
                                f"lower {stage}.lr (now {opt_cfg.lr})")
            scheduler.step()
            train_seconds = time.perf_counter() - started
            test_loss, test_top1 = evaluate(model, test_set, device, autocast)
            density = sparsifier.layer_density()
            history.append({
                "stage": stage, "epoch": epoch + 1, "lr": lr,
                "train_loss": train_loss, "train_top1": correct.item() / seen,
                "test_loss": test_loss, "test_top1": test_top1,
                "threshold": getattr(sparsifier, "threshold", None), "pruned": pruned,
                "reallocations": reallocations, "active_params": sparsifier.active_count(),
                # Of the weights reallocation switched off, the share it had grown at the one before.
                "pruned_grown": pruned_grown if sparsifier.tracks_regrowth else None,
                "pruned_grown_share": pruned_grown / switched_off if sparsifier.tracks_regrowth and switched_off else None,
                "layer_density": density, "seconds": train_seconds,
                "images_per_second": seen / train_seconds,
            })
            save(paths["last"], complete=False)
            bar.remove_task(task)
            log(cfg, f"{stage} epoch {epoch + 1}/{opt_cfg.epochs}  "
                          f"loss {history[-1]['train_loss']:.4f}  test top-1 {test_top1:.4f}  "
                          f"{seen / train_seconds:,.0f} img/s"
                          + (f"  H {sparsifier.threshold:.3g}" if reallocations and hasattr(sparsifier, "threshold") else "")
                          + (f"  pruned {pruned}" if reallocations else ""))
    save(paths["final"], complete=True)
    paths["last"].unlink(missing_ok=True)
    return paths["final"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, device: torch.device,
             autocast: Callable = nullcontext, batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy on a split, without augmentation."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in dataset.batches(batch_size, shuffle=False, augment=False, seed=0, epoch=0, device=device):
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(dataset), correct.item() / len(dataset)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
