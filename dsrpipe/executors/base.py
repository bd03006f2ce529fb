"""The executor interface: what `compare` and `watch` need from whatever runs their jobs.

An executor starts one job (a `python -m ...` command: `dsrpipe run` for compare, a watch job
for watch) with its resources, and says by id whether it ended and with which exit code; it
cancels jobs, and a new executor object re-attaches to a job by the id the last one gave. What
the job prints goes to its log file. A job's run folder is what makes it resumable and
"already complete": every executor gets exact resume for free, and an engine's retry or requeue
is just the same command started again.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import machine
from ..errors import UserError
from ..files import shown
from ..names import SLURM_PARTITION_RULE, is_slurm_partition

LOST = "lost"  # poll(): the engine no longer knows the job (its node died, it was cancelled outside)
PROBE_ENV = (
    "DSRPIPE_TEST_PROBE_DIR"  # tests only: the probe job writes its marker there (a worker's own disk)
)
PROBE_TIMEOUT = 300.0  # seconds the shared-storage probe may wait for a worker
CONNECT_TIMEOUT = 5.0  # seconds a cluster's address has to accept a TCP connection
EXTRA_HINT = {"ray": "pip install 'dsrpipe[ray]'", "slurm": "pip install 'dsrpipe[slurm]'"}


@dataclass(frozen=True)
class Resources:
    """What one job asks for. nproc: processes per job (torchrun with nproc GPUs on Ray; Slurm
    tasks per node); memory in bytes, time in seconds (None: the engine's default)."""

    cpus: int = 1
    gpus: int = 0
    nproc: int = 1
    memory: int | None = None
    time: float | None = None
    partition: str | None = None

    def __post_init__(self):
        for name, low in (("cpus", 1), ("gpus", 0), ("nproc", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} per job must be a whole number of at least {low}, got {value}")
        for name in ("memory", "time"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{name} per job must be more than 0, got {value}")
        if self.partition is not None and not is_slurm_partition(self.partition):
            raise UserError(
                f"partition '{shown(self.partition)}' is no Slurm partition name ({SLURM_PARTITION_RULE})"
            )


@dataclass(frozen=True)
class ExecutorOptions:
    """Where jobs run and what each asks for, as `compare` and `watch` both take them (one option
    group of the command line, docs/cluster.md). A resource left None is not given: the grid's
    `cluster:` section, else Resources' default, decides it."""

    executor: str = "local"  # local | ray | slurm (make_executor)
    address: str | None = None  # ray: the cluster's head (default: a local Ray on loopback)
    cpus: int | None = None
    gpus: int | None = None
    memory: int | None = None  # bytes
    time: float | None = None  # seconds
    partition: str | None = None  # slurm
    dry_run: bool = False  # slurm: print the sbatch script, submit nothing

    def resources(self, nproc: int = 1, base: Resources | None = None) -> Resources:
        """`base` (the grid's `cluster:` section, else the defaults), with what was given instead."""
        given = {k: getattr(self, k) for k in ("cpus", "gpus", "memory", "time", "partition")}
        return dataclasses.replace(
            base or Resources(), nproc=nproc, **{k: v for k, v in given.items() if v is not None}
        )


@dataclass
class JobSpec:
    """One job: `python -m <module> <args>` (through torchrun when nproc > 1 and the module is
    dsrpipe), what it prints appended to `log`, extra environment in `env`."""

    name: str
    module: str
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None


class Executor(ABC):
    """Starts jobs and tells how they ended. Ids are text, kept in journals and printed."""

    name = "local"
    remote = False  # whether its jobs may run on another machine (then outputs must be shared)
    address: str | None = None  # the cluster it joined, where a restarted submitter must join it again

    def __init__(self, resources: Resources):
        self.resources = resources

    @abstractmethod
    def submit(self, spec: JobSpec) -> str:
        """Start the job; its id."""

    @abstractmethod
    def poll(self, job_id: str) -> int | str | None:
        """None while the job runs, its exit code once it ended, LOST if the engine lost it."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop the job (its run resumes from its last checkpoint when started again)."""

    def warm_up(self) -> None:
        """Get ready for a first job that is coming (the fork server starts); most have nothing to do."""
        return None

    def stop(self, job_id: str) -> None:
        """Ask a job that would not outlive the submitter to stop (it checkpoints first)."""
        self.cancel(job_id)

    def kill(self, job_id: str) -> None:
        """Stop a job that did not stop when asked."""
        self.cancel(job_id)

    def enforce_limits(self) -> dict[str, str]:
        """Kill the jobs over their memory or time; {job id: why} for each killed. An engine holds
        its jobs to what they asked for itself: nothing to do here."""
        return {}

    def record(self, job_id: str) -> dict[str, Any]:
        """What a journal keeps of a job, for a restarted submitter to find it again."""
        return {"engine": self.name, "engine_job": job_id, "engine_address": self.address}

    def attach(self, job_id: str) -> bool:
        """Take up a job a previous submitter started; whether the engine still knows it."""
        return self.poll(job_id) != LOST

    def wait(self, job_id: str, timeout: float | None = None, period: float = 0.2) -> int | str | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (result := self.poll(job_id)) is None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(period)
        return result

    def probe(self, folder: Path, token: str) -> int | str | None:
        """Run write_marker(folder, token) where the jobs run, to its end (the shared-storage
        check); remote executors override it."""
        write_marker(str(folder), token, os.environ.get(PROBE_ENV))
        return 0

    def check_storage(self, folder: Path) -> None:
        """Outputs must be where the workers write them: a probe job writes a marker into
        `folder`, which must then be readable here. One line naming the folder otherwise."""
        if not self.remote:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        marker = folder / f".dsrpipe-probe-{token}"
        code = self.probe(folder, token)
        try:
            seen = marker.read_text().strip() == token
        except OSError:
            seen = False
        finally:
            marker.unlink(missing_ok=True)
        if code != 0 or not seen:
            raise UserError(
                f"the output folder {shown(folder)} is not shared with the {self.name} workers: a probe job "
                "wrote a marker there that this machine cannot read; put --out on a filesystem that every "
                "worker mounts at the same path"
            )

    @property
    def keeps_jobs(self) -> bool:
        """Whether its jobs go on once this process is gone (a daemon re-attaches them)."""
        return self.remote

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        """Let go of the engine (jobs keep running where the engine runs them)."""
        return None

    def shutdown(self) -> None:
        """The submitter is done with its jobs (they ended or were cancelled): free what the
        engine holds for it."""
        return None


def connection_refused(address: str) -> OSError | None:
    """Why `address` (host:port) does not accept a TCP connection within CONNECT_TIMEOUT, or
    None if it does."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        return exc
    return None


def threads_per_job(jobs: int, nproc: int) -> int:
    """A local job's thread count: the cores shared between the jobs and their processes, instead
    of every process spinning up one thread per core."""
    return max(1, machine.cores() // (jobs * nproc))


def write_marker(folder: str, token: str, elsewhere: str | None = None) -> int:
    """The probe job's work: a marker file holding `token` in `folder` (in tests, `elsewhere`:
    DSRPIPE_TEST_PROBE_DIR of the submitter, standing for a worker's own disk)."""
    where = Path(elsewhere or folder)
    where.mkdir(parents=True, exist_ok=True)
    (where / f".dsrpipe-probe-{token}").write_text(token + "\n")
    return 0


def job_env(spec: JobSpec, threads: int) -> dict[str, str]:
    """The job's environment: this process's, the spec's, and a thread count that shares the
    cores it was given (unless OMP_NUM_THREADS is set already)."""
    env = {**os.environ, **spec.env}
    if "OMP_NUM_THREADS" not in spec.env and "OMP_NUM_THREADS" not in os.environ:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def missing_extra(engine: str) -> UserError:
    return UserError(f"--executor {engine} needs the {engine} extra: {EXTRA_HINT[engine]}")
