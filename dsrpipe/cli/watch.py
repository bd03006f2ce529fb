"""`dsrpipe watch`, the daemon, and `dsrpipe status`, what it did. Torch-free, as the daemon is
(dsrpipe.watch): its jobs import torch in processes of their own."""

from __future__ import annotations

from pathlib import Path

import typer

from ..quantities import parse_size
from ..watch import WatchOptions, status_report
from ..watch import watch as run_watch
from .common import (
    SUMMARIES,
    AddressOption,
    CpusOption,
    ExecutorOption,
    GpusOption,
    JobMemoryOption,
    JobTimeoutOption,
    NprocOption,
    OutOption,
    PartitionOption,
    executor_options,
    user_errors,
)

app = typer.Typer()

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


@app.command(help=SUMMARIES["watch"])
@user_errors
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
    chosen = executor_options(
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


@app.command(help=SUMMARIES["status"])
@user_errors
def status(
    drop_dir: Path = typer.Argument(..., help="A drop folder served by `dsrpipe watch`.", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the journal as JSON."),
):
    typer.echo(status_report(drop_dir, as_json=as_json))
