"""The `dsrpipe` command: a thin shell over the Python API."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from . import stopping
from .contract import MAX_IMAGE_SIZE
from .errors import UserError
from .outcome import ending
from .quantities import parse_duration, parse_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train compact CNNs with Dynamic Sparse Reparameterization; ship sparse ONNX.",
)

PipelineArg = typer.Argument(..., help="Pipeline YAML file.", show_default=False)
OutOption = typer.Option(Path("export"), "--out", "-o", help="Where <name>/model.onnx and report.json go.")
ForceOption = typer.Option(False, "--force", help="Redo the stage even if its outputs exist.")
ResumeOption = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint.")
ProgressOption = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
NprocOption = typer.Option(
    1,
    "--nproc-per-job",
    help="Processes per run, launched through torchrun (one per GPU; 1: a plain process).",
)
SetOption = typer.Option([], "--set", help="Override a setting: --set train.epochs=5 (repeatable).")
# The executor option group, the same for compare and watch (docs/cluster.md): where jobs run and
# what each asks for. A resource not given comes from a grid's `cluster:` section, else its default.
ExecutorOption = typer.Option(
    "local", "--executor", help="Where jobs run: local (processes here), ray or slurm (docs/cluster.md)."
)
AddressOption = typer.Option(
    None,
    "--address",
    show_default=False,
    help="Ray: the cluster's head, host:port (default: a local Ray on 127.0.0.1).",
)
GpusOption = typer.Option(
    None, "--gpus-per-job", show_default=False, help="GPUs per job (ray, slurm; default 0)."
)
CpusOption = typer.Option(
    None, "--cpus-per-job", show_default=False, help="CPUs per job (ray, slurm; default 1)."
)
JobMemoryOption = typer.Option(
    None,
    "--job-memory",
    "--memory-per-job",
    show_default=False,
    help="Memory per job, e.g. 16G: what a job asks of ray or slurm; a watch job here is killed and "
    "failed past it (default there: 80% of the machine's memory / --workers).",
)
JobTimeoutOption = typer.Option(
    None,
    "--job-timeout",
    "--time",
    show_default=False,
    help="Time limit per job (an attempt of a watch job), e.g. 90m, 12h: a ray or slurm job's limit "
    "(slurm's default 24h); a watch job here is killed and failed past it (default: none).",
)
PartitionOption = typer.Option(None, "--partition", show_default=False, help="Slurm partition.")


def _executor_options(
    executor: str,
    address: str | None,
    gpus: int | None,
    cpus: int | None,
    memory: str | None,
    timeout: str | None,
    partition: str | None,
    dry_run: bool = False,
):
    """The executor option group, read: sizes and durations parsed, each left None if not given."""
    from .executors import ExecutorOptions

    return ExecutorOptions(
        executor=executor,
        address=address,
        gpus=gpus,
        cpus=cpus,
        memory=parse_size(memory) if memory is not None else None,
        time=parse_duration(timeout) if timeout is not None else None,
        partition=partition,
        dry_run=dry_run,
    )


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"dsrpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
):
    pass


def _user_errors(command: Callable) -> Callable:
    """Bad input ends in one line on stderr and a non-zero exit, never a traceback; so does a
    signal (dsrpipe.stopping), at whatever moment of the command it arrives."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        restore = stopping.install()  # None under the entry point: it installed them at its start
        try:
            result = command(*args, **kwargs)
            end = ending()  # done, unless a signal came and something swallowed its exception
        except (typer.Exit, SystemExit):
            raise
        except BaseException as exc:  # every other way out gets its exit code and its one line
            end = ending(exc)
            if end.bug and os.environ.get("DSRPIPE_DEBUG"):
                raise
        finally:
            if restore is not None:  # the caller's own handlers again (tests call in-process)
                restore()
        if end.signal is not None:
            stopping.announce(end.signal)
        elif end.bug:  # one line unless asked for the traceback
            typer.echo(f"{end.cause} (set DSRPIPE_DEBUG=1 for a traceback)", err=True)
        elif end.cause is not None:  # one line, even where the message quotes input with line breaks
            typer.echo(f"error: {' '.join(end.cause.splitlines())}", err=True)
        if end.code:
            raise typer.Exit(end.code)
        return result

    return wrapper


def _load(pipeline: Path, overrides: list[str]):
    from .config import load_pipeline
    from .distributed import is_main

    return load_pipeline(pipeline, overrides, note=lambda m: is_main() and typer.echo(f"note: {m}", err=True))


def _open_run(out: Path, cfg):
    """The run: its folder, and its data and trained model, each read once by whichever stages
    need them. Each command holds the folder's lock throughout: one run, one owner."""
    from .run import Run

    return Run(cfg, out)


@contextmanager
def _owning(run_dir, cfg) -> Iterator[bool]:
    """The run's lock for the block; under torchrun also the job's process group, and the lock
    is rank 0's alone (its peers work on the same run). Yields whether this is rank 0."""
    from . import distributed

    with distributed.process_group(cfg.device, cfg.distributed.timeout) as where, distributed.owner(run_dir):
        yield where.main


def _main_rank() -> bool:
    """Export and validate are rank 0's work: under torchrun the other ranks have none."""
    from .distributed import is_main

    return is_main()


@app.command()
@_user_errors
def run(
    pipeline: Path = PipelineArg,
    out: Path = OutOption,
    overrides: list[str] = SetOption,
    force: bool = ForceOption,
    progress: bool = ProgressOption,
):
    """Run every stage: train-sparse, finetune, export, validate."""
    cfg = _load(pipeline, overrides)  # first: a bad file fails fast, before any work
    pipeline_run = _open_run(out, cfg)
    with _owning(pipeline_run.dir, cfg) as main:
        from .pipeline import run_stages

        run_stages(pipeline_run, force=force, progress=progress)
    if main:
        typer.echo(str(pipeline_run.dir.onnx))


def _training_command(name: str, summary: str, stage: Callable[[], Callable]) -> None:
    """A command that trains (train-sparse, finetune): every rank under torchrun, rank 0 owning
    the run. `stage()` imports the stage's function, on use (see `_load`)."""

    @app.command(name, help=summary)
    @_user_errors
    def command(
        pipeline: Path = PipelineArg,
        out: Path = OutOption,
        overrides: list[str] = SetOption,
        resume: bool = ResumeOption,
        force: bool = ForceOption,
        progress: bool = ProgressOption,
    ):
        cfg = _load(pipeline, overrides)
        pipeline_run = _open_run(out, cfg)
        with _owning(pipeline_run.dir, cfg) as main:
            final = stage()(pipeline_run, resume=resume, force=force, progress=progress)
        if main:
            typer.echo(str(final))


def _deploy_command(name: str, summary: str, stage: Callable[[], Callable]) -> None:
    """A command that works on the trained model (export, validate): rank 0's alone, under the
    run's lock; prints what `stage()`'s function returns."""

    @app.command(name, help=summary)
    @_user_errors
    def command(
        pipeline: Path = PipelineArg,
        out: Path = OutOption,
        overrides: list[str] = SetOption,
        force: bool = ForceOption,
    ):
        cfg = _load(pipeline, overrides)
        if not _main_rank():
            return
        pipeline_run = _open_run(out, cfg)
        with pipeline_run.dir.lock():
            typer.echo(str(stage()(pipeline_run, force=force)))


def _train_stage():
    from .train import train_stage

    return train_stage


def _finetune_stage():
    from .train import finetune_stage

    return finetune_stage


def _export_stage():
    from .deploy.stages import export_stage

    return export_stage


def _validate_stage():
    from .deploy.stages import validate_stage

    def validate(pipeline_run, *, force: bool) -> Path:
        validate_stage(pipeline_run, force=force)
        return pipeline_run.dir.report

    return validate


_training_command(
    "train-sparse", "Train from scratch with the configured sparse method (DSR by default).", _train_stage
)
_training_command("finetune", "Fine-tune the trained model with its masks frozen.", _finetune_stage)
_deploy_command("export", "Export the trained model to a sparse ONNX file.", _export_stage)
_deploy_command(
    "validate", "Measure the exported model with onnxruntime and write report.json.", _validate_stage
)


@app.command()
@_user_errors
def predict(
    model: Path = typer.Argument(..., help="An exported model.onnx.", show_default=False),
    images: list[Path] = typer.Argument(..., help="Image files, or folders of them.", show_default=False),
    top_k: int = typer.Option(1, "--top-k", "-k", help="Classes to list per image."),
    max_side: int = typer.Option(
        None,
        "--max-side",
        show_default=False,
        help=f"Largest image side a model may declare, in pixels: 1 to {MAX_IMAGE_SIZE} "
        "(the default, data.image_size's bound).",
    ),
):
    """Classify images with an exported model (onnxruntime, numpy and Pillow only)."""
    from .deploy.predict import format_predictions
    from .deploy.predict import predict as classify

    typer.echo(format_predictions(classify(model, images, top_k, max_side)))


@app.command()
@_user_errors
def check(pipeline: Path = PipelineArg, overrides: list[str] = SetOption):
    """Validate a pipeline YAML without running it."""
    cfg = _load(pipeline, overrides)
    from .preflight import check_model

    check_model(cfg, note=lambda m: typer.echo(f"note: {m}", err=True))
    typer.echo(
        f"{pipeline}: ok ({cfg.name}: {cfg.model.name} on {cfg.data.dataset}, "
        f"{cfg.sparsity.method} at sparsity {cfg.sparsity.sparsity})"
    )


@app.command()
def models():
    """List the model names dsrpipe knows."""
    from .models import list_models

    typer.echo("\n".join(list_models()))


GridArg = typer.Argument(
    ..., help="Grid YAML: a base pipeline × methods × sparsities × seeds.", show_default=False
)
GridOutOption = typer.Option(Path("export"), "--out", "-o", help="Where <grid>/runs/ and the results go.")
JobsOption = typer.Option(1, "--jobs", "-j", help="Runs at a time; the CPU threads are split between them.")
DryRunOption = typer.Option(
    False, "--dry-run", help="Slurm: print the sbatch script a run would be submitted with; submit nothing."
)


@app.command()
@_user_errors
def compare(
    grid: Path = GridArg,
    out: Path = GridOutOption,
    jobs: int = JobsOption,
    nproc_per_job: int = NprocOption,
    executor: str = ExecutorOption,
    address: str = AddressOption,
    gpus_per_job: int = GpusOption,
    cpus_per_job: int = CpusOption,
    job_memory: str = JobMemoryOption,
    job_timeout: str = JobTimeoutOption,
    partition: str = PartitionOption,
    dry_run: bool = DryRunOption,
):
    """Run a grid of pipelines and tabulate top-1 against non-zero parameters."""
    from .compare import run_grid

    cluster = _executor_options(
        executor, address, gpus_per_job, cpus_per_job, job_memory, job_timeout, partition, dry_run
    )
    result = run_grid(grid, out, jobs=jobs, nproc_per_job=nproc_per_job, cluster=cluster)
    if dry_run:
        typer.echo(result["sbatch"])
        return
    typer.echo(str(result["md"]))
    crashed = [r.name for r in result["runs"] if r.status == "crashed"]
    if crashed:  # the table is written, but the grid is not complete: a script must see that
        raise UserError(
            f"{len(crashed)} of {len(result['runs'])} runs crashed ({', '.join(crashed[:5])}"
            f"{', ...' if len(crashed) > 5 else ''}): see {result['md']}"
        )


DropArg = typer.Argument(..., help="The drop folder to watch.", show_default=False)
TemplateOption = typer.Option(
    None,
    "--template",
    show_default=False,
    help="Pipeline for dataset drops (default: DROP_DIR/template.yaml, else a built-in one).",
)
QuietOption = typer.Option(
    5.0, "--quiet-period", help="Seconds a drop must stay unchanged before it is taken."
)
WorkersOption = typer.Option(1, "--workers", help="Jobs run at the same time.")
RerunOption = typer.Option(False, "--rerun", help="Run content again when it is dropped again.")
OnceOption = typer.Option(False, "--once", help="Process what is there, then exit (cron, tests).")
LogFileOption = typer.Option(None, "--log-file", help="Also log to this file.", show_default=False)
MaxUnpackedOption = typer.Option(
    None, "--max-unpacked", show_default=False, help="Cap on a dataset archive's unpacked size, e.g. 50G."
)
MaxFilesOption = typer.Option(
    None, "--max-files", show_default=False, help="Cap on a dataset archive's member count."
)


@app.command()
@_user_errors
def watch(
    drop_dir: Path = DropArg,
    out: Path = OutOption,
    template: Path = TemplateOption,
    quiet: float = QuietOption,
    workers: int = WorkersOption,
    rerun: bool = RerunOption,
    once: bool = OnceOption,
    log_file: Path = LogFileOption,
    max_unpacked: str = MaxUnpackedOption,
    max_files: int = MaxFilesOption,
    nproc_per_job: int = NprocOption,
    executor: str = ExecutorOption,
    address: str = AddressOption,
    gpus_per_job: int = GpusOption,
    cpus_per_job: int = CpusOption,
    job_memory: str = JobMemoryOption,
    job_timeout: str = JobTimeoutOption,
    partition: str = PartitionOption,
):
    """Watch a drop folder: run each pipeline YAML or dataset dropped there, exactly once."""
    from .watch import WatchOptions
    from .watch import watch as run_watch

    chosen = _executor_options(
        executor, address, gpus_per_job, cpus_per_job, job_memory, job_timeout, partition
    )
    run_watch(
        WatchOptions(
            drop_dir,
            out=out,
            template=template,
            quiet=quiet,
            workers=workers,
            rerun=rerun,
            once=once,
            log_file=log_file,
            max_unpacked=parse_size(max_unpacked) if max_unpacked else None,
            max_files=max_files,
            nproc_per_job=nproc_per_job,
            executor=chosen,
        )
    )


@app.command()
@_user_errors
def status(
    drop_dir: Path = typer.Argument(..., help="A drop folder served by `dsrpipe watch`.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the journal as JSON."),
):
    """List the jobs of a watched drop folder and their states."""
    from .watch import status_report

    typer.echo(status_report(drop_dir, as_json=as_json))
