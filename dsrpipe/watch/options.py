"""`dsrpipe watch`'s options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

JOB_MEMORY_SHARE = 0.8  # default --job-memory: this share of the machine's memory, split between workers


@dataclass
class WatchOptions:
    drop: Path
    out: Path = Path("export")
    template: Path | None = None  # default: <drop>/template.yaml, else DEFAULT_TEMPLATE
    quiet: float = 5.0  # seconds a drop must stay unchanged before it is taken
    workers: int = 1
    rerun: bool = False
    once: bool = False
    log_file: Path | None = None
    max_unpacked: int | None = None  # archive caps for dataset drops; None: dsrpipe.data's
    max_files: int | None = None
    # Local jobs: the limits the runner enforces. Engine jobs: what each asks the engine for
    # (None: the engine's default); the engine enforces them.
    job_memory: int | None = None  # bytes a job may use; None (local): default_job_memory(workers)
    job_timeout: float | None = None  # seconds an attempt of a job may run; None: no limit
    nproc_per_job: int = 1  # processes per job, through torchrun (the limits apply to them all)
    executor: str = "local"  # local | ray | slurm (dsrpipe.executors)
    address: str | None = None  # ray: the cluster's head (default: a local Ray on loopback)
    gpus_per_job: int = 0  # ray, slurm
    cpus_per_job: int = 1  # ray, slurm
    partition: str | None = None  # slurm

    def __post_init__(self):
        if self.nproc_per_job < 1:
            raise UserError(f"--nproc-per-job must be at least 1, got {self.nproc_per_job}")


def default_job_memory(workers: int) -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's or a systemd unit's own limit, if lower
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2, or "max"
        pass
    return int(total * JOB_MEMORY_SHARE / workers)
