"""Stages `train-sparse` and `finetune`: one training recipe, readable top to bottom.

Each stage writes, under `<out>/<name>/<stage>/` (see dsrpipe.rundir):
  last.pt        checkpoint after every epoch (model, masks, optimizer, LR schedule, sparsifier
                 state, RNG states, metrics so far): `resume` continues bit for bit on CPU;
  final.pt       the same once the stage is complete; later stages read it;
  metrics.jsonl  one JSON line per epoch (and the same figures as TensorBoard scalars).

Under torchrun (see dsrpipe.distributed) every rank trains its part of each global batch
(train.batch_size per rank) in DistributedDataParallel, evaluates its part of the test set, and
reallocates identically; rank 0 alone writes.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import distributed
from .checkpoint import load_checkpoint, read_finished_run, restoring, save_checkpoint
from .config import DataConfig, OptimConfig, Pipeline
from .data import ArchiveCaps, Dataset, load_data
from .errors import UserError
from .models import create_model
from .preflight import check_input_size
from .registry import build_sparsifier, layer_selection
from .rundir import COMPLETE, STALE, UNFINISHED, RunDir
from .sparse import Sparsifier
from .sparse.cost import model_cost
from .sparse.frozen import initial_weights
from .sparse.slicing import cut_to_live
from .sparse.thin import thin_model_options
from .tensorboard_log import ScalarLog

console = Console(stderr=True, highlight=False, soft_wrap=True)


def log(cfg: Pipeline, message: str) -> None:
    if distributed.is_main():  # one voice per job
        console.print(f"{cfg.name} | {message}", markup=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{name}' requested but CUDA is not available here")
    return torch.device(name)


def build_model(spec: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model a spec describes; a run that shrank while it trained records its live channels
    (`live_channels`), and the model is cut to them."""
    model = create_model(
        spec["name"],
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
        image_size=spec["image_size"],
        **spec["options"],
    ).to(device)
    if spec.get("live_channels"):
        cut_to_live(model, blank_input(spec, device), spec["live_channels"])
    return model


def blank_input(spec: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """One blank input of the model's shape: what tracing and MAC counting run on."""
    return torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"], device=device)


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """The process's peak resident memory so far, and on a GPU the peak CUDA memory, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": rss, "peak_cuda_bytes": cuda}


def load_splits(data: DataConfig, archive_caps: ArchiveCaps = ArchiveCaps()) -> tuple[Dataset, Dataset]:
    """The (train, test) splits as configured (`archive_caps`: what an archive may unpack to)."""
    return load_data(
        data.dataset,
        root=data.root,
        download=data.download,
        image_size=data.image_size,
        cache_dir=data.cache_dir,
        num_workers=data.num_workers,
        max_train=data.max_train,
        max_test=data.max_test,
        archive_caps=archive_caps,
    )


def train_sparse(
    cfg: Pipeline, out: Path, *, resume: bool = False, force: bool = False, progress: bool = True
) -> Path:
    """Train from scratch with the configured sparse method (DSR by default); returns final.pt."""

    s = cfg.sparsity

    def make_sparsifier(model, optimizer, steps_per_epoch, example_inputs):
        return build_sparsifier(
            s,
            model,
            optimizer,
            seed=cfg.seed,
            steps_per_epoch=steps_per_epoch,
            epochs=cfg.train.epochs,
            example_inputs=example_inputs,
        )

    def thin_spec(spec):  # thin-dense: a narrower dense model with the sparse model's parameter count
        options, params, budget = thin_model_options(
            spec["name"],
            spec["options"],
            num_classes=spec["num_classes"],
            in_channels=spec["in_channels"],
            image_size=spec["image_size"],
            sparsity=s.sparsity,
            layers=layer_selection(s),
        )
        log(
            cfg,
            f"thin-dense: {options} gives {params:,} parameters for a budget of {budget:,} "
            f"({params / budget - 1:+.1%})",
        )
        return {**spec, "options": options, "thin_dense": {"params": params, "budget": budget}}

    def source_spec(spec):  # frozen, from a run that shrank while it trained: its narrower model
        source = read_finished_run(s.masks_from, "masks_from")["model_spec"]
        live = source.get("live_channels") if isinstance(source, dict) else None
        return {**spec, "live_channels": live} if live else spec

    return _fit(
        cfg,
        "train",
        cfg.train,
        RunDir(out, cfg.name),
        make_sparsifier,
        start_from=None,
        adapt_spec={"thin-dense": thin_spec, "frozen": source_spec}.get(s.method),
        resume=resume,
        force=force,
        progress=progress,
    )


def finetune(
    cfg: Pipeline, out: Path, *, resume: bool = False, force: bool = False, progress: bool = True
) -> Path:
    """Continue from the trained model with its masks frozen, at a low learning rate."""
    run = RunDir(out, cfg.name)
    run.require("train", cfg)
    trained = load_checkpoint(run.final("train"))

    def make_sparsifier(model, optimizer, steps_per_epoch, example_inputs):
        masks = trained["sparsifier"]["masks"]
        s = cfg.sparsity
        frozen = Sparsifier(
            model, optimizer, sparsity=s.sparsity if masks else 0.0, layers=layer_selection(s)
        )
        frozen.load_masks(masks)
        # Removed channels stay removed: held at zero, or already cut out of a shrunk run's model.
        if "channels" in trained["sparsifier"] and not trained["sparsifier"].get("shrunk", False):
            frozen.hold_removed_channels(trained["sparsifier"]["channels"], example_inputs)
        return frozen

    return _fit(
        cfg,
        "finetune",
        cfg.finetune,
        run,
        make_sparsifier,
        start_from=trained,
        adapt_spec=lambda spec: trained["model_spec"],  # the model as trained
        resume=resume,
        force=force,
        progress=progress,
    )


def _fit(
    cfg: Pipeline,
    stage: str,
    opt_cfg: OptimConfig,
    run: RunDir,
    make_sparsifier: Callable[..., Sparsifier],
    *,
    start_from: dict | None,
    resume: bool,
    force: bool,
    progress: bool,
    adapt_spec: Callable[[dict], dict] | None = None,
) -> Path:
    """The recipe every stage follows: where to start, build, restore, train epoch by epoch
    (each recorded and checkpointed), finish."""
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed.active() else (0, 1)
    )
    if distributed.restarted():  # torchrun restarted the job after a failure: continue, not start over
        resume = True
        force = force and not _made_by_this_job(run, stage)
    start = _starting_point(cfg, stage, run, world, resume=resume, force=force)
    if start == COMPLETE:
        log(cfg, f"{stage}: already complete ({run.final(stage)})")
        return run.final(stage)
    t = _build(cfg, stage, opt_cfg, run, make_sparsifier, start_from, adapt_spec, rank, world)
    if start is not None:
        _restore(t, start)
    t.wrap()
    board = ScalarLog(run.tensorboard(stage), t.history) if t.main and cfg.log.tensorboard else None
    with _progress_bar(progress and t.main) as bar:
        for epoch in range(len(t.history), opt_cfg.epochs):
            t.history.append(_one_epoch(t, epoch, bar))
            if t.main:
                t.save(run.last(stage), complete=False)
                if board is not None:
                    board.add(t.history[-1])
            _log_epoch(t)
    if t.main:
        t.save(run.final(stage), complete=True)
        run.last(stage).unlink(missing_ok=True)
        if board is not None:
            board.close()
    distributed.barrier()  # the next stage, on every rank, reads final.pt
    return run.final(stage)


def _starting_point(cfg: Pipeline, stage: str, run: RunDir, world: int, *, resume: bool, force: bool):
    """COMPLETE, the checkpoint to resume from, or None to start afresh; a stale or unfinished run
    that the options do not allow to replace or continue is an error."""
    if force:
        return None
    state = run.state(stage, cfg)
    distributed.agree(f"the state of {stage}", state)
    if state == COMPLETE:
        return COMPLETE
    if state == STALE:
        raise UserError(
            f"{run.stage_dir(stage)} holds a {stage} run with other settings: use --force to redo it"
        )
    if state != UNFINISHED:
        return None
    last = run.last(stage)
    if not resume:
        raise UserError(
            f"{last} holds an unfinished {stage} run: use --resume to continue it or --force to start over"
        )
    checkpoint = load_checkpoint(last)
    made_by = checkpoint.get("world_size", 1)
    if made_by != world:
        raise UserError(
            f"{last} was trained by {made_by} process(es), this job has {world}: resume "
            f"it with {made_by} (the global batch, hence every step, depends on it) "
            "or use --force to start over"
        )
    distributed.agree(f"the epoch to resume {stage} from", checkpoint["epoch"])
    return checkpoint


@dataclass
class _Training:
    """One stage's run as it trains: what it was built from, what it trains, what it has recorded."""

    cfg: Pipeline
    stage: str
    opt_cfg: OptimConfig
    run: RunDir
    rank: int
    world: int
    fingerprint: str
    device: torch.device
    train_set: Dataset
    test_set: Dataset
    steps_per_epoch: int
    spec: dict[str, Any]
    init: dict[str, torch.Tensor]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparsifier: Sparsifier
    step_model: torch.nn.Module = None
    autocast: Callable = nullcontext
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    macs: int = 0  # multiply-accumulates of one forward pass of one sample, as the model is now

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, macs: int | None = None) -> torch.nn.Module:
        """The module the training steps call: the model, in DDP under torchrun, compiled with
        train.compile; built again after a shrink, which gives the model new parameters (and
        costs `macs` per sample from then on)."""
        model = self.model
        if self.world > 1:  # every rank starts from rank 0's weights and buffers, and averages gradients
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.opt_cfg.compile:
            if self.step_model is not None:  # compiled once per shape: forget the old one's graphs
                torch._dynamo.reset()
            model = compile_for_training(model)
        self.step_model = model
        self.macs = (
            macs if macs is not None else model_cost(self.model, blank_input(self.spec, self.device))[1]
        )
        return model

    def model_spec(self) -> dict[str, Any]:
        """The spec that rebuilds the model as it is now (shrunk: with its live channels)."""
        channels = self.sparsifier.channels
        if channels is None or not channels.shrunk:
            return self.spec
        return {**self.spec, "live_channels": channels.live_channels()}

    def save(self, path: Path, complete: bool) -> None:
        save_checkpoint(
            path,
            {
                "stage": self.stage,
                "complete": complete,
                "fingerprint": self.fingerprint,
                "run_id": self.run_id,
                "epoch": len(self.history),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sparsifier": self.sparsifier.state_dict(),
                "method": self.sparsifier.method,
                "rng": _rng_state(),
                "history": self.history,
                "world_size": self.world,
                "job": distributed.job_id(),
                "model_spec": self.model_spec(),
                "init": self.init,
                "data_info": asdict(self.train_set.info),
                "config": self.cfg.model_dump(mode="json"),
            },
        )
        self.run.write_history(self.stage, self.history)


def _build(cfg, stage, opt_cfg, run, make_sparsifier, start_from, adapt_spec, rank, world) -> _Training:
    """Data, model, optimizer, LR schedule and sparsifier for the stage, on its device and ranks."""
    fingerprint = run.fingerprint(stage, cfg)
    device = distributed.device_for(resolve_device(cfg.device))
    with distributed.node_leader_first():
        train_set, test_set = load_splits(cfg.data)
    info = train_set.info
    if cfg.data.dataset == "imagefolder" and cfg.data.image_size is None:
        log(
            cfg,
            f"data: images fitted to {info.image_size}x{info.image_size}, their median side (data.image_size sets it)",
        )
    steps_per_epoch = train_set.num_batches(opt_cfg.batch_size * world, drop_last=True)
    if steps_per_epoch == 0:
        raise UserError(
            f"{stage}.batch_size {opt_cfg.batch_size}"
            + (f" × {world} ranks" if world > 1 else "")
            + f" exceeds the {len(train_set)} training images"
        )
    if world > 1:
        log(cfg, f"{stage}: {distributed.ddp_log_line(world, opt_cfg.batch_size)}")
        test_set = test_set.subset(torch.arange(rank, len(test_set), world))  # reduced in `evaluate`
    sync_bn = world > 1 and cfg.distributed.sync_bn
    if sync_bn and device.type != "cuda":
        raise UserError(
            "distributed.sync_bn: torch's SyncBatchNorm runs on CUDA only; train on GPUs or set it to false"
        )

    torch.manual_seed(cfg.seed)
    spec = {
        "name": cfg.model.name,
        "options": cfg.model.options,
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "image_size": info.image_size,
    }
    if adapt_spec is not None:  # a model other than the configured one (thin-dense; finetune's trained one)
        spec = adapt_spec(spec)
    # Fine-tuning builds all this from the trained checkpoint: model, masks, weights.
    with restoring(run.final("train")) if start_from is not None else nullcontext():
        model = build_model(spec, device)
        # Before anything traces or trains it: a model the images are too small for is one line.
        check_input_size(model, blank_input(spec, device), spec["name"])
        init = initial_weights(model, cfg.seed)  # so that a frozen run can start where this one started
        if sync_bn:  # the same parameters and buffers, in modules that average over the ranks
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if device.type == "cuda":  # cuDNN's fast convolutions (and bf16 tensor cores) want NHWC
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=opt_cfg.lr,
            momentum=opt_cfg.momentum,
            nesterov=opt_cfg.nesterov and opt_cfg.momentum > 0,
            weight_decay=opt_cfg.weight_decay,
            fused=device.type == "cuda" or None,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, opt_cfg.milestones, opt_cfg.gamma)
        sparsifier = make_sparsifier(model, optimizer, steps_per_epoch, blank_input(spec, device))
        if (
            start_from is None
            and sparsifier.channels is not None
            and (note := sparsifier.channels.unrounded_note())
        ):
            log(cfg, f"note: {note}")
        if world > 1:
            sparsifier.defer_gradient_hooks()  # to see the gradients DDP has averaged
        if start_from is not None:  # after the sparsifier: its initial random mask would zero trained weights
            model.load_state_dict(start_from["model"])

    use_bf16 = cfg.bf16 and device.type == "cuda"
    if cfg.bf16 and not use_bf16:
        log(cfg, "bf16 autocast applies on CUDA only; training in float32")
    return _Training(
        cfg,
        stage,
        opt_cfg,
        run,
        rank,
        world,
        fingerprint,
        device,
        train_set,
        test_set,
        steps_per_epoch,
        spec,
        init,
        model,
        optimizer,
        scheduler,
        sparsifier,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext,
    )


def _restore(t: _Training, checkpoint: dict[str, Any]) -> None:
    """Continue an unfinished run exactly where its last checkpoint left it."""
    with restoring(t.run.last(t.stage)):
        t.run_id = checkpoint["run_id"]
        # The sparsifier first: a run that shrank is cut to its live channels before its weights load.
        t.sparsifier.load_state_dict(checkpoint["sparsifier"])
        t.model.load_state_dict(checkpoint["model"])
        t.optimizer.load_state_dict(checkpoint["optimizer"])
        t.scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"])
        t.history = checkpoint["history"]
    log(t.cfg, f"{t.stage}: resuming after epoch {len(t.history)}")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def _one_epoch(t: _Training, epoch: int, bar: Progress) -> dict[str, Any]:
    """Train one epoch, evaluate, and return its record for metrics.jsonl and TensorBoard."""
    stage, opt_cfg, sparsifier = t.stage, t.opt_cfg, t.sparsifier
    task = bar.add_task(f"{t.cfg.name} | {stage} {epoch + 1}/{opt_cfg.epochs}", total=t.steps_per_epoch)
    started = time.perf_counter()
    lr = t.optimizer.param_groups[0]["lr"]
    batches = t.train_set.batches(
        opt_cfg.batch_size * t.world,
        shuffle=True,
        augment=t.cfg.data.augment,
        seed=t.cfg.seed + (1000 if stage == "finetune" else 0),  # a fresh data order per stage
        epoch=epoch,
        device=t.device,
        drop_last=True,
        shard=(t.rank, t.world),
    )
    shrinks = []

    def shrunk(event: dict[str, Any]) -> torch.nn.Module:
        shrinks.append(event)
        if t.main:
            log(t.cfg, f"{stage}: {_shrink_line(event)}")
        return t.wrap(event["macs_after"])

    macs_at_start = t.macs
    totals = train_one_epoch(
        t.step_model,
        t.optimizer,
        sparsifier,
        batches,
        t.autocast,
        on_step=_step_callback(lambda: bar.advance(task), epoch + 1, t.steps_per_epoch),
        on_reallocation=lambda: distributed.check_masks(sparsifier.checked_state(), sparsifier.iteration),
        on_shrink=shrunk,
    )
    loss_sum, correct, seen = totals["loss_sum"], totals["correct"], totals["seen"]
    for line in totals["warnings"]:
        log(t.cfg, f"warning: {line}")
    if t.world > 1:  # the global batch's figures (pruned and the like are the same on every rank)
        loss_sum, correct, seen = distributed.all_sum(loss_sum, correct, seen)
        seen = int(seen.item())
    train_loss = loss_sum.item() / seen
    if not math.isfinite(train_loss):  # keep last.pt of the last sound epoch; stop wasting time
        raise UserError(
            f"{stage} diverged: the training loss is {train_loss} in epoch {epoch + 1}; "
            f"lower {stage}.lr (now {opt_cfg.lr})"
        )
    t.scheduler.step()
    train_seconds = time.perf_counter() - started
    test_loss, test_top1, nonfinite = evaluate(t.model, t.test_set, t.device, t.autocast)
    if nonfinite or not math.isfinite(test_loss):  # a model that outputs NaN must never be exported
        raise UserError(
            f"{stage} diverged: {nonfinite} test outputs are NaN or infinite (test loss {test_loss}) in "
            f"epoch {epoch + 1}, though the training loss is finite; in eval mode the model uses its "
            f"BatchNorm running statistics, which have likely blown up: lower {stage}.lr (now "
            f"{opt_cfg.lr}) or train with a larger batch"
        )
    bar.remove_task(task)
    regrows = sparsifier.tracks_regrowth
    switched_off, pruned_grown = totals["switched_off"], totals["pruned_grown"]
    return {
        "stage": stage,
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        "train_top1": correct.item() / seen,
        "test_loss": test_loss,
        "test_top1": test_top1,
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
        "seconds": train_seconds,
        "images_per_second": seen / train_seconds,
        # Training cost: forward MACs per sample at the epoch's start and end, and summed over
        # the images trained on (× 3 or so with the backward pass); when the model shrank.
        "macs": t.macs,
        "macs_at_start": macs_at_start,
        "mac_images": _mac_images(macs_at_start, shrinks, t.steps_per_epoch, sparsifier.iteration, seen),
        "shrinks": shrinks,
        "warnings": totals["warnings"],  # for the report as well as the log
        **peak_memory(t.device),
    }


def _mac_images(macs: int, shrinks: list[dict], steps: int, last_iteration: int, seen: int) -> int:
    """MACs × images over an epoch of `steps` equal batches ending at `last_iteration`, the model
    costing `macs` per sample at first and what each shrink left after the step it came in."""
    per_step = seen // steps
    total, iteration = 0, last_iteration - steps
    for event in shrinks:
        total += macs * per_step * (event["iteration"] - iteration)
        macs, iteration = event["macs_after"], event["iteration"]
    return total + macs * per_step * (last_iteration - iteration)


def _shrink_line(event: dict[str, Any]) -> str:
    """One shrink, for the log."""
    return (
        f"shrunk at iteration {event['iteration']}: params {event['params_before']:,} → "
        f"{event['params_after']:,}, MACs {event['macs_before']:,} → {event['macs_after']:,}"
    )


def _log_epoch(t: _Training) -> None:
    h = t.history[-1]
    line = (
        f"{t.stage} epoch {h['epoch']}/{t.opt_cfg.epochs}  loss {h['train_loss']:.4f}  "
        f"test top-1 {h['test_top1']:.4f}  {h['images_per_second']:,.0f} img/s"
    )
    if h["reallocations"]:
        if h["threshold"] is not None:
            line += f"  H {t.sparsifier.threshold:.3g}"
        line += f"  pruned {h['pruned']}"
    if h.get("channels_alive"):
        line += f"  channels {sum(h['channels_alive'].values())}/{t.sparsifier.channels.total}"
    log(t.cfg, line)


def _made_by_this_job(run: RunDir, stage: str) -> bool:
    """Whether the stage's checkpoint comes from this very torchrun job (an earlier attempt of
    it): a restarted `--force` job continues what it forced instead of forcing it again."""
    path = next((p for p in (run.final(stage), run.last(stage)) if p.exists()), None)
    return (
        path is not None
        and distributed.job_id() is not None
        and load_checkpoint(path).get("job") == distributed.job_id()
    )


def _step_callback(on_step: Callable[[], None], epoch: int, steps: int) -> Callable[[], None]:
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


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
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
