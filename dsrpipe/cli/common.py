"""What the commands share: their one-line summaries, the one-line ending of a command
(`user_errors`), and the options that more than one command takes: the output folder, the
processes per run, and the executor option group of compare and watch. Torch-free: watch and
status import it."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import typer

from .. import stopping
from ..executors import ExecutorOptions
from ..outcome import ending
from ..quantities import parse_duration, parse_size

# Each command's one line: the first line of its own --help, and its line in `dsrpipe --help`, which
# lists the commands from here without importing their modules (as pip's command table does).
SUMMARIES = {
    "run": "Run every stage: train-sparse, finetune, export, validate.",
    "train-sparse": "Train from scratch with the configured sparse method (DSR by default).",
    "finetune": "Fine-tune the trained model with its masks frozen.",
    "export": "Export the trained model to a sparse ONNX file.",
    "validate": "Measure the exported model with onnxruntime and write report.json.",
    "predict": "Classify images with an exported model (onnxruntime, numpy and Pillow only).",
    "check": "Validate a pipeline YAML without running it.",
    "models": "List the model names dsrpipe knows.",
    "compare": "Run a grid of pipelines and tabulate top-1 against non-zero parameters.",
    "watch": "Watch a drop folder: run each pipeline YAML or dataset dropped there, exactly once.",
    "status": "List the jobs of a watched drop folder and their states.",
}

OutOption = typer.Option(Path("export"), "--out", "-o", help="Where <name>/model.onnx and report.json go.")
NprocOption = typer.Option(
    1,
    "--nproc-per-job",
    help="Processes per run, launched through torchrun (one per GPU; 1: a plain process).",
)
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


def executor_options(
    executor: str,
    address: str | None,
    gpus: int | None,
    cpus: int | None,
    memory: str | None,
    timeout: str | None,
    partition: str | None,
    dry_run: bool = False,
) -> ExecutorOptions:
    """The executor option group, read: sizes and durations parsed, each left None if not given."""
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


def user_errors(command: Callable) -> Callable:
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
