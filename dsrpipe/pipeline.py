"""`dsrpipe run`: train-sparse → finetune → export → validate, skipping what is already complete.

Output contract, relied upon by users and tools (the whole layout: dsrpipe.rundir):
  <out>/<name>/model.onnx    the deployable model (float32 NCHW pixels in [0, 1] → logits)
  <out>/<name>/model.fp32.onnx  beside an int8 model.onnx: the float32 model it quantizes
  <out>/<name>/report.json   what was trained and how the exported model measured

One Run (dsrpipe.run) goes through every stage, so the run's folder, data and trained model are
each made or read once. The stages and their order are `rundir.stages`; what each does is STEPS.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distributed
from .config import Pipeline
from .deploy import stages as deploy
from .report import Report
from .run import Run
from .rundir import stages
from .train import finetune_stage, train_stage


def _train(run: Run, *, force: bool, progress: bool) -> Path:
    return train_stage(run, resume=True, force=force, progress=progress)


def _finetune(run: Run, *, force: bool, progress: bool) -> Path:
    return finetune_stage(run, resume=True, force=force, progress=progress)


def _export(run: Run, *, force: bool, progress: bool) -> Path:
    return deploy.export_stage(run, force=force)


def _validate(run: Run, *, force: bool, progress: bool) -> Report:
    return deploy.validate_stage(run, force=force)


# What each stage of `dsrpipe run` does; an interrupted training stage resumes from its last.pt.
STEPS: dict[str, Callable[..., Any]] = {
    "train": _train,
    "finetune": _finetune,
    "export": _export,
    "validate": _validate,
}
# Rank 0's alone under torchrun: the other ranks have no part in them.
MAIN_RANK_STAGES = ("export", "validate")


def run_stages(run: Run, *, force: bool = False, progress: bool = True) -> Report | None:
    """Every stage of `run` in order; returns the report (None on a rank other than 0)."""
    result = None
    for stage in stages(run.cfg):
        if stage in MAIN_RANK_STAGES and not distributed.is_main():
            return None
        result = STEPS[stage](run, force=force, progress=progress)
    return result


def run_pipeline(
    cfg: Pipeline, out: Path = Path("export"), *, force: bool = False, progress: bool = True
) -> Report | None:
    """All stages in order; an interrupted stage resumes from its last checkpoint. Under torchrun
    every rank trains; rank 0 alone exports and validates (the others return None)."""
    return run_stages(Run(cfg, out), force=force, progress=progress)


def export_stage(cfg: Pipeline, out: Path, *, force: bool = False) -> Path:
    """The export stage alone (dsrpipe.deploy.stages.export_stage on a run of its own)."""
    return deploy.export_stage(Run(cfg, out), force=force)


def validate_stage(cfg: Pipeline, out: Path, *, force: bool = False) -> Report:
    """The validate stage alone (dsrpipe.deploy.stages.validate_stage on a run of its own)."""
    return deploy.validate_stage(Run(cfg, out), force=force)
