"""`dsrpipe run` and its stages, each a command of its own (train-sparse, finetune, export,
validate); `check`, a pipeline without running it; `models`, the model names.

A command reads its pipeline first (a bad file fails before any work), then opens the Run (its
folder, and its data and trained model, each read once by whichever stages need them) and holds
the folder's lock throughout: one run, one owner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from .. import distributed
from ..config import Pipeline, load_pipeline
from ..deploy.stages import export_stage, validate_stage
from ..models import list_models
from ..pipeline import run_stages
from ..preflight import check_model
from ..run import Run
from ..train import finetune_stage, train_stage
from .common import SUMMARIES, OutOption, user_errors

app = typer.Typer()

PipelineArg = typer.Argument(..., help="Pipeline YAML file.", show_default=False)
ForceOption = typer.Option(False, "--force", help="Redo the stage even if its outputs exist.")
ResumeOption = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint.")
ProgressOption = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
SetOption = typer.Option([], "--set", help="Override a setting: --set train.epochs=5 (repeatable).")


def _load(pipeline: Path, overrides: list[str]) -> Pipeline:
    return load_pipeline(
        pipeline, overrides, note=lambda m: distributed.is_main() and typer.echo(f"note: {m}", err=True)
    )


@contextmanager
def _owned(pipeline: Path, out: Path, overrides: list[str]) -> Iterator[tuple[Run, bool]]:
    """The run of a command that trains, its lock held for the block; under torchrun also the
    job's process group, and the lock is rank 0's alone (its peers work on the same run). Yields
    the run and whether this is rank 0."""
    cfg = _load(pipeline, overrides)
    pipeline_run = Run(cfg, out)
    with distributed.process_group(cfg.device, cfg.distributed.timeout) as where:
        with distributed.owner(pipeline_run.dir):
            yield pipeline_run, where.main


@app.command(help=SUMMARIES["run"])
@user_errors
def run(
    pipeline: Path = PipelineArg,
    out: Path = OutOption,
    overrides: list[str] = SetOption,
    force: bool = ForceOption,
    progress: bool = ProgressOption,
):
    with _owned(pipeline, out, overrides) as (pipeline_run, main):
        run_stages(pipeline_run, force=force, progress=progress)
    if main:
        typer.echo(str(pipeline_run.dir.onnx))


def _training_command(name: str, stage: Callable[..., Path]) -> None:
    """A command that trains (train-sparse, finetune): every rank under torchrun, rank 0 owning
    the run."""

    @app.command(name, help=SUMMARIES[name])
    @user_errors
    def command(
        pipeline: Path = PipelineArg,
        out: Path = OutOption,
        overrides: list[str] = SetOption,
        resume: bool = ResumeOption,
        force: bool = ForceOption,
        progress: bool = ProgressOption,
    ):
        with _owned(pipeline, out, overrides) as (pipeline_run, main):
            final = stage(pipeline_run, resume=resume, force=force, progress=progress)
        if main:
            typer.echo(str(final))


def _deploy_command(name: str, stage: Callable[..., Path]) -> None:
    """A command that works on the trained model (export, validate): rank 0's alone, under the
    run's lock; prints what `stage` returns."""

    @app.command(name, help=SUMMARIES[name])
    @user_errors
    def command(
        pipeline: Path = PipelineArg,
        out: Path = OutOption,
        overrides: list[str] = SetOption,
        force: bool = ForceOption,
    ):
        cfg = _load(pipeline, overrides)
        if not distributed.is_main():  # under torchrun the other ranks have none of this work
            return
        pipeline_run = Run(cfg, out)
        with pipeline_run.dir.lock():
            typer.echo(str(stage(pipeline_run, force=force)))


def _validate(pipeline_run: Run, *, force: bool) -> Path:
    validate_stage(pipeline_run, force=force)
    return pipeline_run.dir.report


_training_command("train-sparse", train_stage)
_training_command("finetune", finetune_stage)
_deploy_command("export", export_stage)
_deploy_command("validate", _validate)


@app.command(help=SUMMARIES["check"])
@user_errors
def check(pipeline: Path = PipelineArg, overrides: list[str] = SetOption):
    cfg = _load(pipeline, overrides)
    check_model(cfg, note=lambda m: typer.echo(f"note: {m}", err=True))
    typer.echo(
        f"{pipeline}: ok ({cfg.name}: {cfg.model.name} on {cfg.data.dataset}, "
        f"{cfg.sparsity.method} at sparsity {cfg.sparsity.sparsity})"
    )


@app.command(help=SUMMARIES["models"])
def models():
    typer.echo("\n".join(list_models()))
