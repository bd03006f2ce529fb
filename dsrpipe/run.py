"""One run of a pipeline, `<out>/<name>/`: its settings, its folder, its data and its trained model,
each read once however many stages use them.

The stages (train-sparse and finetune in dsrpipe.train, export and validate in
dsrpipe.deploy.stages) all take the Run; `dsrpipe run` and a watch job hand the same one to each
in turn (dsrpipe.pipeline.run_stages), so the splits are loaded once and the shipped checkpoint is
read once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import distributed
from .checkpoint import restoring
from .config import DataConfig, Pipeline
from .data import ArchiveCaps, Dataset, load_data
from .errors import UserError
from .rundir import COMPLETE, STALE, UNFINISHED, RunDir, shipped_stage
from .trained import Checkpoint, ModelSpec

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


class Run:
    """One run: `cfg` and its folder `dir`; the data, the device and the trained checkpoints are
    read on first use and kept (`archive_caps`: what a dataset archive may unpack to)."""

    def __init__(self, cfg: Pipeline, out: str | Path, archive_caps: ArchiveCaps = ArchiveCaps()):
        self.cfg = cfg
        self.dir = RunDir(out, cfg.name)
        self.archive_caps = archive_caps
        self._checkpoints: dict[str, tuple[dict[str, Any], Checkpoint]] = {}
        self._shipped: ShippedModel | None = None

    def log(self, message: str) -> None:
        log(self.cfg, message)

    @cached_property
    def device(self) -> torch.device:
        """This process's device: the configured one, a rank's own GPU under torchrun."""
        return distributed.device_for(resolve_device(self.cfg.device))

    @cached_property
    def splits(self) -> tuple[Dataset, Dataset]:
        """The (train, test) splits, loaded once (under torchrun, by one rank per node first:
        it fills the caches the others then read)."""
        with distributed.node_leader_first():
            splits = load_splits(self.cfg.data, self.archive_caps)
        info = splits[0].info
        if self.cfg.data.dataset == "imagefolder" and self.cfg.data.image_size is None:
            self.log(
                f"data: images fitted to {info.image_size}x{info.image_size}, their median side "
                "(data.image_size sets it)"
            )
        return splits

    def configured_spec(self) -> ModelSpec:
        """The configured model for this data."""
        info = self.splits[0].info
        return ModelSpec(
            name=self.cfg.model.name,
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            image_size=info.image_size,
            options=self.cfg.model.options,
        )

    def method_spec(self) -> ModelSpec:
        """The model train-sparse trains: the configured one as the method changes it."""
        return self.cfg.sparsity.trained_spec(self.configured_spec(), self.log)

    def checkpoint(self, stage: str) -> Checkpoint:
        """The final checkpoint of a training stage (read once while the file stays the same)."""
        path = self.dir.final(stage)
        raw = self.dir.read_checkpoint(path)
        known = self._checkpoints.get(stage)
        if known is None or known[0] is not raw:
            with restoring(path):
                known = self._checkpoints[stage] = (raw, Checkpoint.from_dict(raw))
        return known[1]

    def starting_point(self, stage: str, world: int, *, resume: bool, force: bool) -> Checkpoint | str | None:
        """Where `stage` starts: COMPLETE, the checkpoint to resume from, or None to start afresh;
        a stale or unfinished run that the options do not allow to replace or continue is an
        error (`world`: the job's processes, which a resumed run must have been trained by)."""
        if force:
            return None
        state = self.dir.state(stage, self.cfg)
        distributed.agree(f"the state of {stage}", state)
        if state == COMPLETE:
            return COMPLETE
        if state == STALE:
            raise UserError(
                f"{self.dir.stage_dir(stage)} holds a {stage} run with other settings: use --force to redo it"
            )
        if state != UNFINISHED:
            return None
        last = self.dir.last(stage)
        if not resume:
            raise UserError(
                f"{last} holds an unfinished {stage} run: use --resume to continue it or --force to start over"
            )
        with restoring(last):
            checkpoint = Checkpoint.from_dict(self.dir.read_checkpoint(last))
        if checkpoint.world_size != world:
            raise UserError(
                f"{last} was trained by {checkpoint.world_size} process(es), this job has {world}: resume "
                f"it with {checkpoint.world_size} (the global batch, hence every step, depends on it) "
                "or use --force to start over"
            )
        distributed.agree(f"the epoch to resume {stage} from", checkpoint.epoch)
        return checkpoint

    def made_by_this_job(self, stage: str) -> bool:
        """Whether the stage's checkpoint comes from this very torchrun job (an earlier attempt of
        it): a restarted `--force` job continues what it forced instead of forcing it again."""
        path = next((p for p in (self.dir.final(stage), self.dir.last(stage)) if p.exists()), None)
        return (
            path is not None
            and distributed.job_id() is not None
            and self.dir.read_checkpoint(path).get("job") == distributed.job_id()
        )

    def shipped(self) -> ShippedModel:
        """The trained model that export ships and validate measures: the fine-tuned one if the
        pipeline fine-tunes, required complete and current; built once."""
        stage = shipped_stage(self.cfg)
        self.dir.require(stage, self.cfg)
        checkpoint = self.checkpoint(stage)
        if self._shipped is None or self._shipped.checkpoint is not checkpoint:
            with restoring(self.dir.final(stage)):
                model = checkpoint.model_spec.build()
                model.load_state_dict(checkpoint.model)
            self._shipped = ShippedModel(self.cfg, checkpoint, model.eval())
        return self._shipped


@dataclass
class ShippedModel:
    """The trained model to ship, with the checkpoint it came from."""

    cfg: Pipeline
    checkpoint: Checkpoint
    model: torch.nn.Module
    _summary: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def spec(self) -> ModelSpec:
        return self.checkpoint.model_spec

    def configured_width(self) -> torch.nn.Module:
        """An untrained model of the configured width, for what a thin-dense model stands in for
        or a shrunk one started as."""
        return self.spec.at_width(self.cfg.model.options).build().eval()

    def sparsity_summary(self) -> dict[str, Any]:
        """Sparsity as deployed, read off the weights once: zeros over the sparse-eligible
        tensors, and the whole-model parameter counts (dense layers included), as the paper
        reports them. A model that shrank while it trained counts its sparse tensors at the width
        it started at, as the target does."""
        if self._summary is None:
            self._summary = _sparsity_summary(self.model, self.cfg, self)
        return self._summary


def _sparsity_summary(model: torch.nn.Module, cfg: Pipeline, shipped: ShippedModel) -> dict[str, Any]:
    layers = cfg.sparsity.layers
    sparse = layers.select(model)
    started = layers.select(shipped.configured_width()) if shipped.spec.live_channels else sparse
    sparse_total = sum(w.numel() for w in started.values())
    sparse_nonzero = sum(int(w.count_nonzero()) for w in sparse.values())
    return {
        "sparsity": 1 - sparse_nonzero / sparse_total if sparse_total else 0.0,
        "layer_density": {n: int(w.count_nonzero()) / started[n].numel() for n, w in sparse.items()},
        "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
