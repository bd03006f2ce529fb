"""Stages `train-sparse` and `finetune`: one training recipe, readable top to bottom.

Each stage writes, under `<out>/<name>/<stage>/` (see dsrpipe.rundir):
  last.pt        checkpoint after every epoch (model, masks, optimizer, LR schedule, sparsifier
                 state, RNG states, metrics so far): `resume` continues bit for bit on CPU;
  final.pt       the same once the stage is complete; later stages read it;
  metrics.jsonl  one JSON line per epoch (and the same figures as TensorBoard scalars).

Under torchrun (see dsrpipe.distributed) every rank trains its part of each global batch
(train.batch_size per rank) in DistributedDataParallel, evaluates its part of the test set, and
reallocates identically; rank 0 alone writes. The loop's parts are in dsrpipe.trainloop.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from . import distributed
from .checkpoint import restoring, save_checkpoint
from .config import OptimConfig, Pipeline
from .data import Dataset
from .errors import UserError
from .preflight import check_input_size
from .run import Run, console, load_splits
from .rundir import COMPLETE
from .sparse import Sparsifier
from .sparse.cost import model_cost
from .sparse.frozen import initial_weights
from .sparsifiers import build_sparsifier
from .tensorboard_log import ScalarLog
from .trained import Checkpoint, ModelSpec
from .trainloop import (
    compile_for_training,
    epoch_line,
    evaluate,
    mac_images,
    peak_memory,
    progress_bar,
    rng_state,
    set_rng_state,
    shrink_line,
    sparsity_record,
    step_callback,
    train_one_epoch,
)

# Kept importable from here, where they always were (watch's jobs, benchmarks, tests).
__all__ = ["compile_for_training", "evaluate", "load_splits", "train_one_epoch"]

# The sparsifier of a stage, for its model and optimizer: (model, optimizer, steps per epoch,
# example inputs) -> Sparsifier.
SparsifierFactory = Callable[[torch.nn.Module, torch.optim.Optimizer, int, torch.Tensor], Sparsifier]


@dataclass(frozen=True)
class Stage:
    """What a training stage is: its name and settings, the sparsifier it trains with, the model
    it trains (a thunk: the data decides its shape) and the checkpoint it starts from."""

    name: str
    optim: OptimConfig
    make_sparsifier: SparsifierFactory
    spec: Callable[[], ModelSpec]
    start_from: Checkpoint | None = None


def train_sparse(
    cfg: Pipeline, out: Path, *, resume: bool = False, force: bool = False, progress: bool = True
) -> Path:
    """Train from scratch with the configured sparse method (DSR by default); returns final.pt."""
    return train_stage(Run(cfg, out), resume=resume, force=force, progress=progress)


def finetune(
    cfg: Pipeline, out: Path, *, resume: bool = False, force: bool = False, progress: bool = True
) -> Path:
    """Continue from the trained model with its masks frozen, at a low learning rate."""
    return finetune_stage(Run(cfg, out), resume=resume, force=force, progress=progress)


def train_stage(run: Run, *, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """train-sparse on `run`: the configured method, from scratch."""
    cfg = run.cfg

    def make_sparsifier(model, optimizer, steps_per_epoch, example_inputs):
        return build_sparsifier(
            cfg.sparsity,
            model,
            optimizer,
            seed=cfg.seed,
            steps_per_epoch=steps_per_epoch,
            epochs=cfg.train.epochs,
            example_inputs=example_inputs,
        )

    stage = Stage("train", cfg.train, make_sparsifier, spec=run.method_spec)
    return fit(run, stage, resume=resume, force=force, progress=progress)


def finetune_stage(run: Run, *, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """finetune on `run`: the trained model with its masks frozen."""
    cfg = run.cfg
    run.dir.require("train", cfg)
    trained = run.checkpoint("train")

    def make_sparsifier(model, optimizer, steps_per_epoch, example_inputs):
        masks = trained.sparsifier["masks"]
        s = cfg.sparsity
        frozen = Sparsifier(model, optimizer, sparsity=s.sparsity if masks else 0.0, layers=s.layers)
        frozen.load_masks(masks)
        # Removed channels stay removed: held at zero, or already cut out of a shrunk run's model.
        if "channels" in trained.sparsifier and not trained.sparsifier.get("shrunk", False):
            frozen.hold_removed_channels(trained.sparsifier["channels"], example_inputs)
        return frozen

    stage = Stage(
        "finetune", cfg.finetune, make_sparsifier, spec=lambda: trained.model_spec, start_from=trained
    )
    return fit(run, stage, resume=resume, force=force, progress=progress)


def fit(run: Run, stage: Stage, *, resume: bool, force: bool, progress: bool) -> Path:
    """The recipe every stage follows: where to start, build, restore, train epoch by epoch
    (each recorded and checkpointed), finish."""
    name, final = stage.name, run.dir.final(stage.name)
    if distributed.restarted():  # torchrun restarted the job after a failure: continue, not start over
        resume = True
        force = force and not run.made_by_this_job(name)
    start = run.starting_point(name, _ranks()[1], resume=resume, force=force)
    if start == COMPLETE:
        run.log(f"{name}: already complete ({final})")
        return final
    t = _build(run, stage)
    if start is not None:
        _restore(t, start)
    t.wrap()
    board = t.scalar_log()
    with progress_bar(progress and t.main, console) as bar:
        for epoch in range(len(t.history), stage.optim.epochs):
            t.history.append(_one_epoch(t, epoch, bar))
            if t.main:
                t.save(run.dir.last(name), complete=False)
                if board is not None:
                    board.add(t.history[-1])
            run.log(epoch_line(t.history[-1], name, stage.optim.epochs, t.sparsifier))
    if t.main:
        t.save(final, complete=True)
        run.dir.last(name).unlink(missing_ok=True)
        if board is not None:
            board.close()
    distributed.barrier()  # the next stage, on every rank, reads final.pt
    return final


def _ranks() -> tuple[int, int]:
    """(this process's rank, the job's world size): (0, 1) outside torchrun."""
    if not distributed.active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


@dataclass
class TrainingParts:
    """What a stage trains: the model (as its spec rebuilds it), its initial weights' record, and
    the optimizer, LR schedule and sparsifier stepping it."""

    spec: ModelSpec
    init: dict[str, Any]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparsifier: Sparsifier


@dataclass
class _Training:
    """One stage's run as it trains: the run and stage it belongs to, this process's part of the
    job, what it trains, what it has recorded."""

    run: Run
    stage: Stage
    rank: int
    world: int
    fingerprint: str
    test_set: Dataset  # this rank's part of the test split
    steps_per_epoch: int
    parts: TrainingParts
    autocast: Callable = nullcontext
    step_model: torch.nn.Module | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    macs: int = 0  # multiply-accumulates of one forward pass of one sample, as the model is now

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cfg(self) -> Pipeline:
        return self.run.cfg

    @property
    def model(self) -> torch.nn.Module:
        return self.parts.model

    @property
    def sparsifier(self) -> Sparsifier:
        return self.parts.sparsifier

    def wrap(self, macs: int | None = None) -> torch.nn.Module:
        """The module the training steps call: the model, in DDP under torchrun, compiled with
        train.compile; built again after a shrink, which gives the model new parameters (and
        costs `macs` per sample from then on)."""
        model, device = self.model, self.run.device
        if self.world > 1:  # every rank starts from rank 0's weights and buffers, and averages gradients
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if self.stage.optim.compile:
            if self.step_model is not None:  # compiled once per shape: forget the old one's graphs
                torch._dynamo.reset()
            model = compile_for_training(model)
        self.step_model = model
        self.macs = (
            macs if macs is not None else model_cost(self.model, self.parts.spec.blank_input(device))[1]
        )
        return model

    def scalar_log(self):
        """The stage's TensorBoard log (rank 0, if the pipeline logs to TensorBoard), else None."""
        if not (self.main and self.cfg.log.tensorboard):
            return None
        return ScalarLog(self.run.dir.tensorboard(self.stage.name), self.history)

    def model_spec(self) -> ModelSpec:
        """The spec that rebuilds the model as it is now (shrunk: with its live channels)."""
        channels = self.sparsifier.channels
        if channels is None or not channels.shrunk:
            return self.parts.spec
        return self.parts.spec.with_live_channels(channels.live_channels())

    def save(self, path: Path, complete: bool) -> None:
        parts = self.parts
        checkpoint = Checkpoint(
            stage=self.stage.name,
            complete=complete,
            fingerprint=self.fingerprint,
            run_id=self.run_id,
            epoch=len(self.history),
            model=parts.model.state_dict(),
            optimizer=parts.optimizer.state_dict(),
            scheduler=parts.scheduler.state_dict(),
            sparsifier=parts.sparsifier.state_dict(),
            method=parts.sparsifier.method,
            rng=rng_state(),
            history=self.history,
            world_size=self.world,
            job=distributed.job_id(),
            recorded_spec=self.model_spec().to_dict(),
            init=parts.init,
            data_info=asdict(self.run.splits[0].info),
            config=self.cfg.model_dump(mode="json"),
        )
        save_checkpoint(path, checkpoint.to_dict())
        self.run.dir.write_history(self.stage.name, self.history)


def _build(run: Run, stage: Stage) -> _Training:
    """Data, model, optimizer, LR schedule and sparsifier for the stage, on its device and ranks."""
    cfg, (rank, world) = run.cfg, _ranks()
    fingerprint = run.dir.fingerprint(stage.name, cfg)
    device = (
        run.device
    )  # before the data: under torchrun it sets this rank's GPU, which the ranks' barriers use
    train_set, test_set = run.splits
    steps_per_epoch = _steps_per_epoch(train_set, stage, world)
    if world > 1:
        run.log(f"{stage.name}: {distributed.ddp_log_line(world, stage.optim.batch_size)}")
        test_set = test_set.subset(torch.arange(rank, len(test_set), world))  # reduced in `evaluate`
    sync_bn = world > 1 and cfg.distributed.sync_bn
    if sync_bn and device.type != "cuda":
        raise UserError(
            "distributed.sync_bn: torch's SyncBatchNorm runs on CUDA only; train on GPUs or set it to false"
        )
    torch.manual_seed(cfg.seed)  # before the model: its initial weights come from it
    # Fine-tuning builds all this from the trained checkpoint: model, masks, weights.
    with restoring(run.dir.final("train")) if stage.start_from is not None else nullcontext():
        parts = _parts(run, stage, stage.spec(), steps_per_epoch, sync_bn, world)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    if cfg.bf16 and not use_bf16:
        run.log("bf16 autocast applies on CUDA only; training in float32")
    return _Training(
        run,
        stage,
        rank=rank,
        world=world,
        fingerprint=fingerprint,
        test_set=test_set,
        steps_per_epoch=steps_per_epoch,
        parts=parts,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext,
    )


def _steps_per_epoch(train_set: Dataset, stage: Stage, world: int) -> int:
    """Full global batches per epoch; none at all is a UserError."""
    batch = stage.optim.batch_size
    steps = train_set.num_batches(batch * world, drop_last=True)
    if steps == 0:
        raise UserError(
            f"{stage.name}.batch_size {batch}"
            + (f" × {world} ranks" if world > 1 else "")
            + f" exceeds the {len(train_set)} training images"
        )
    return steps


def _parts(run: Run, stage: Stage, spec: ModelSpec, steps_per_epoch: int, sync_bn: bool, world: int):
    """The model as `spec` builds it, and the optimizer, LR schedule and sparsifier that train it."""
    device, opt = run.device, stage.optim
    model = spec.build(device)
    # Before anything traces or trains it: a model the images are too small for is one line.
    check_input_size(model, spec.blank_input(device), spec.name)
    init = initial_weights(model, run.cfg.seed)  # so that a frozen run can start where this one started
    if sync_bn:  # the same parameters and buffers, in modules that average over the ranks
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cuda":  # cuDNN's fast convolutions (and bf16 tensor cores) want NHWC
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=opt.lr,
        momentum=opt.momentum,
        nesterov=opt.nesterov and opt.momentum > 0,
        weight_decay=opt.weight_decay,
        fused=device.type == "cuda" or None,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, opt.milestones, opt.gamma)
    sparsifier = stage.make_sparsifier(model, optimizer, steps_per_epoch, spec.blank_input(device))
    if stage.start_from is None and sparsifier.channels is not None:
        if note := sparsifier.channels.unrounded_note():
            run.log(f"note: {note}")
    if world > 1:
        sparsifier.defer_gradient_hooks()  # to see the gradients DDP has averaged
    if (
        stage.start_from is not None
    ):  # after the sparsifier: its initial random mask would zero trained weights
        model.load_state_dict(stage.start_from.model)
    return TrainingParts(spec, init, model, optimizer, scheduler, sparsifier)


def _restore(t: _Training, checkpoint: Checkpoint) -> None:
    """Continue an unfinished run exactly where its last checkpoint left it."""
    with restoring(t.run.dir.last(t.stage.name)):
        t.run_id = checkpoint.run_id
        # The sparsifier first: a run that shrank is cut to its live channels before its weights load.
        t.sparsifier.load_state_dict(checkpoint.sparsifier)
        t.model.load_state_dict(checkpoint.model)
        t.parts.optimizer.load_state_dict(checkpoint.optimizer)
        t.parts.scheduler.load_state_dict(checkpoint.scheduler)
        set_rng_state(checkpoint.rng)
        t.history = list(checkpoint.history)
    t.run.dir.forget_checkpoints()  # the model holds it now; last.pt is rewritten after this epoch
    t.run.log(f"{t.stage.name}: resuming after epoch {len(t.history)}")


def _one_epoch(t: _Training, epoch: int, bar: Progress) -> dict[str, Any]:
    """Train one epoch, evaluate, and return its record for metrics.jsonl and TensorBoard."""
    name, optim, sparsifier = t.stage.name, t.stage.optim, t.sparsifier
    task = bar.add_task(f"{t.cfg.name} | {name} {epoch + 1}/{optim.epochs}", total=t.steps_per_epoch)
    started = time.perf_counter()
    lr = t.parts.optimizer.param_groups[0]["lr"]
    shrinks = []

    def shrunk(event: dict[str, Any]) -> torch.nn.Module:
        shrinks.append(event)
        if t.main:
            t.run.log(f"{name}: {shrink_line(event)}")
        return t.wrap(event["macs_after"])

    macs_at_start = t.macs
    totals = train_one_epoch(
        t.step_model,
        t.parts.optimizer,
        sparsifier,
        _batches(t, epoch),
        t.autocast,
        on_step=step_callback(lambda: bar.advance(task), epoch + 1, t.steps_per_epoch),
        on_reallocation=lambda: distributed.check_masks(sparsifier.checked_state(), sparsifier.iteration),
        on_shrink=shrunk,
    )
    for line in totals["warnings"]:
        t.run.log(f"warning: {line}")
    train_loss, train_top1, seen = _training_figures(t, totals, epoch)
    t.parts.scheduler.step()
    seconds = time.perf_counter() - started
    test_loss, test_top1 = _evaluated(t, epoch)
    bar.remove_task(task)
    return {
        "stage": name,
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_loss,
        "train_top1": train_top1,
        "test_loss": test_loss,
        "test_top1": test_top1,
        **sparsity_record(sparsifier, totals),
        "seconds": seconds,
        "images_per_second": seen / seconds,
        # Training cost: forward MACs per sample at the epoch's start and end, and summed over
        # the images trained on (× 3 or so with the backward pass); when the model shrank.
        "macs": t.macs,
        "macs_at_start": macs_at_start,
        "mac_images": mac_images(macs_at_start, shrinks, t.steps_per_epoch, sparsifier.iteration, seen),
        "shrinks": shrinks,
        "warnings": totals["warnings"],  # for the report as well as the log
        **peak_memory(t.run.device),
    }


def _batches(t: _Training, epoch: int):
    """This rank's part of the epoch's global batches, augmented, on the device."""
    return t.run.splits[0].batches(
        t.stage.optim.batch_size * t.world,
        shuffle=True,
        augment=t.cfg.data.augment,
        seed=t.cfg.seed + (1000 if t.stage.name == "finetune" else 0),  # a fresh data order per stage
        epoch=epoch,
        device=t.run.device,
        drop_last=True,
        shard=(t.rank, t.world),
    )


def _training_figures(t: _Training, totals: dict[str, Any], epoch: int) -> tuple[float, float, int]:
    """(loss, top-1, images) over the global batches of the epoch; a loss that is not finite
    stops training, keeping last.pt of the last sound epoch."""
    loss_sum, correct, seen = totals["loss_sum"], totals["correct"], totals["seen"]
    if t.world > 1:  # the global batch's figures (pruned and the like are the same on every rank)
        loss_sum, correct, seen = distributed.all_sum(loss_sum, correct, seen)
        seen = int(seen.item())
    train_loss = loss_sum.item() / seen
    if not math.isfinite(train_loss):
        name = t.stage.name
        raise UserError(
            f"{name} diverged: the training loss is {train_loss} in epoch {epoch + 1}; "
            f"lower {name}.lr (now {t.stage.optim.lr})"
        )
    return train_loss, correct.item() / seen, seen


def _evaluated(t: _Training, epoch: int) -> tuple[float, float]:
    """Test loss and top-1; a model that outputs NaN must never be exported."""
    test_loss, test_top1, nonfinite = evaluate(t.model, t.test_set, t.run.device, t.autocast)
    if nonfinite or not math.isfinite(test_loss):
        name = t.stage.name
        raise UserError(
            f"{name} diverged: {nonfinite} test outputs are NaN or infinite (test loss {test_loss}) in "
            f"epoch {epoch + 1}, though the training loss is finite; in eval mode the model uses its "
            f"BatchNorm running statistics, which have likely blown up: lower {name}.lr (now "
            f"{t.stage.optim.lr}) or train with a larger batch"
        )
    return test_loss, test_top1
