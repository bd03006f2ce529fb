"""Where `compare` and `watch` run their jobs: the executor interface (base.py) and the registry
of executors (make_executor): `local`, processes on this machine (local.py: started fresh, for
compare; forkserver.py: forked from a warm server, for the watch daemon), `ray` (ray.py; joining
its cluster: ray_cluster.py) and `slurm` (submitit, slurm.py). See docs/cluster.md. Nothing here
imports torch (nor ray, before a Ray executor is made: it takes seconds): the watch daemon
imports it."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import LOST, Executor, ExecutorOptions, JobSpec, Resources
from .forkserver import ForkServerExecutor
from .local import LocalExecutor
from .ray import RayExecutor
from .slurm import SlurmExecutor

ENGINES = ("local", "ray", "slurm")

__all__ = ["ENGINES", "LOST", "Executor", "ExecutorOptions", "JobSpec", "Resources", "make_executor"]


def make_executor(
    engine: str,
    resources: Resources,
    *,
    owner: str,
    folder: Path,
    jobs: int = 1,
    address: str | None = None,
    local: bool = False,
    tasks_per_node: int = 1,
    dry_run: bool = False,
    preload: list[str] | None = None,
) -> Executor:
    """The executor named `engine`. `owner` names a Ray submitter's actor (a daemon's is the
    same after a restart); `folder` holds submitit's files for Slurm; `preload`, the modules a
    local job uses, forks local jobs from a server that has them imported (the watch daemon)."""
    if engine not in ENGINES:
        raise UserError(f"--executor {engine}: expected one of {', '.join(ENGINES)}")
    if address is not None and engine != "ray":
        raise UserError("--address is for --executor ray")
    if dry_run and engine != "slurm":
        raise UserError("--dry-run is for --executor slurm (it prints the sbatch script)")
    if engine == "local":
        return (
            LocalExecutor(resources, jobs)
            if preload is None
            else ForkServerExecutor(resources, jobs, preload)
        )
    if engine == "ray":
        return RayExecutor(resources, owner, address)
    return SlurmExecutor(resources, folder, local=local, tasks_per_node=tasks_per_node, dry_run=dry_run)
