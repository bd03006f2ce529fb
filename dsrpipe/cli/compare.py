"""`dsrpipe compare`: a grid of pipelines, run on an executor, tabulated."""

from __future__ import annotations

from pathlib import Path

import typer

from ..compare import run_grid
from ..errors import UserError
from .common import (
    SUMMARIES,
    AddressOption,
    CpusOption,
    ExecutorOption,
    GpusOption,
    JobMemoryOption,
    JobTimeoutOption,
    NprocOption,
    PartitionOption,
    executor_options,
    user_errors,
)

app = typer.Typer()

GridArg = typer.Argument(
    ..., help="Grid YAML: a base pipeline × methods × sparsities × seeds.", show_default=False
)
GridOutOption = typer.Option(Path("export"), "--out", "-o", help="Where <grid>/runs/ and the results go.")
JobsOption = typer.Option(1, "--jobs", "-j", help="Runs at a time; the CPU threads are split between them.")
DryRunOption = typer.Option(
    False, "--dry-run", help="Slurm: print the sbatch script a run would be submitted with; submit nothing."
)


@app.command(help=SUMMARIES["compare"])
@user_errors
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
    cluster = executor_options(
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
