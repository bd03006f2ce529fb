"""Where `compare` and `watch` run their jobs: the executor interface (base.py) and its three
executors, `local` (processes on this machine, local.py), `ray` (ray.py) and `slurm` (submitit,
slurm.py). See docs/cluster.md."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import LOST, Executor, JobSpec, Resources

ENGINES = ("local", "ray", "slurm")

__all__ = ["ENGINES", "LOST", "Executor", "JobSpec", "Resources", "make_executor"]


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
) -> Executor:
    """The executor named `engine`. `owner` names a Ray submitter's actor (a daemon's is the
    same after a restart); `folder` holds submitit's files for Slurm."""
    if engine not in ENGINES:
        raise UserError(f"--executor {engine}: expected one of {', '.join(ENGINES)}")
    if address is not None and engine != "ray":
        raise UserError("--address is for --executor ray")
    if dry_run and engine != "slurm":
        raise UserError("--dry-run is for --executor slurm (it prints the sbatch script)")
    # Imported here, each when named: the engines are optional extras, and the local executor
    # imports torch (torchrun's loopback store), which the watch daemon does not load for itself.
    if engine == "local":
        from .local import LocalExecutor

        return LocalExecutor(resources, jobs)
    if engine == "ray":
        from .ray import RayExecutor

        return RayExecutor(resources, owner, address)
    from .slurm import SlurmExecutor

    return SlurmExecutor(resources, folder, local=local, tasks_per_node=tasks_per_node, dry_run=dry_run)
