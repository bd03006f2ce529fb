"""`dsrpipe watch`'s options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..executors import ExecutorOptions


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
    nproc_per_job: int = 1  # processes per job, through torchrun (the limits apply to them all)
    # Where the jobs run and what each may use (the option group that compare shares). Local jobs
    # are held to their memory (default: a share of the machine's, executors.limits) and time by
    # their executor; an engine's jobs ask the engine for them (None: the engine's default).
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)

    def __post_init__(self):
        if self.nproc_per_job < 1:
            raise UserError(f"--nproc-per-job must be at least 1, got {self.nproc_per_job}")
