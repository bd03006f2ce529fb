"""`dsrpipe watch`'s options, and how sizes and durations are read and shown."""

from __future__ import annotations

import os
import re
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
    job_memory: int | None = None  # bytes a job may use; None: default_job_memory(workers)
    job_timeout: float | None = None  # seconds an attempt of a job may run; None: no limit
    nproc_per_job: int = 1  # processes per job, through torchrun (the limits apply to them all)
    executor: str = "local"  # local | ray | slurm (dsrpipe.executors)
    address: str | None = None  # ray: the cluster's head (default: a local Ray on loopback)
    gpus_per_job: int = 0  # ray, slurm
    cpus_per_job: int = 1  # ray, slurm

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


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5T' or a plain number of bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"cannot read size '{text}' (e.g. 500M, 20G)")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def format_size(size: int) -> str:
    """Bytes as parse_size reads them: 2G, 1.5G, 600M."""
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if size >= 1024**power:
            return f"{size / 1024**power:.3g}{unit}"
    return str(size)


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '2h', '1d' in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"cannot read duration '{text}' (e.g. 90s, 30m, 2h)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2].lower()]
