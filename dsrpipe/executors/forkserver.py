"""The local executor of a long-lived submitter (the watch daemon): every job a process forked
from a server that has the job's modules imported and warmed up (`preload`), so that a job
starts in milliseconds and pays no first-use set-up; the server starts with the first job, or
on warm_up(). A job runs `python -m <module> <args>` there, as it would on Ray or Slurm, in a
session of its own (its pid is its process group's): a crash or an out-of-memory kill takes
down that job only.

No engine holds these jobs to their resources, so this executor does (enforce_limits): a job
over its memory or time is killed, with that cause. Ids are process ids; the submitter stops
its jobs when it ends (they resume from their last checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import signal
import sys
import time
from typing import Any

from ..quantities import format_size
from .base import LOST, Executor, JobSpec, Resources, job_env, threads_per_job
from .limits import default_job_memory, group_memory
from .processes import ForkServer, signal_group

JOIN_WAIT = 10.0  # seconds to reap a job killed with SIGKILL


def run_forked(module: str, args: list[str], log: str, env: dict[str, str]) -> None:
    """In the forked job process: its own session, its output to the end of its log, then
    `python -m module args` (its exit status, the process's)."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(env)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class ForkServerExecutor(Executor):
    name = "local"

    def __init__(self, resources: Resources, jobs: int, preload: list[str]):
        super().__init__(dataclasses.replace(resources, memory=resources.memory or default_job_memory(jobs)))
        self.jobs = jobs
        self.server = ForkServer(preload)
        self.processes: dict[str, Any] = {}  # job id -> its multiprocessing.Process, while it runs
        self.started: dict[str, float] = {}  # job id -> monotonic
        self.ended: dict[str, int] = {}  # job id -> exit code
        self.killed: set[str] = set()

    def warm_up(self) -> None:
        self.server.warm_up()

    def submit(self, spec: JobSpec) -> str:
        env = job_env(spec, threads_per_job(self.jobs, self.resources.nproc))
        process = self.server.start(
            run_forked, (spec.module, spec.args, str(spec.log), env), f"dsrpipe-job-{spec.name}"
        )
        job_id = str(process.pid)
        self.processes[job_id], self.started[job_id] = process, time.monotonic()
        return job_id

    def poll(self, job_id: str) -> int | str | None:
        process = self.processes.get(job_id)
        if process is None:
            return self.ended.get(job_id, LOST)
        if process.exitcode is None:
            return None
        self.ended[job_id] = process.exitcode
        del self.processes[job_id]
        process.close()
        return self.ended[job_id]

    def stop(self, job_id: str) -> None:
        self._signal(job_id, signal.SIGTERM)

    def kill(self, job_id: str) -> None:
        self._signal(job_id, signal.SIGKILL)
        process = self.processes.get(job_id)
        if process is not None:
            process.join(JOIN_WAIT)

    cancel = stop

    def _signal(self, job_id: str, sig: int) -> None:
        if job_id in self.processes:
            signal_group(int(job_id), sig)

    def enforce_limits(self) -> dict[str, str]:
        live = [job_id for job_id in self.processes if job_id not in self.killed]
        usage = group_memory(int(job_id) for job_id in live)
        r, killed = self.resources, {}
        for job_id in live:
            used = usage.get(int(job_id), 0)
            if r.time and time.monotonic() - self.started[job_id] > r.time:
                killed[job_id] = f"exceeded --job-timeout {r.time:g}s"
            elif r.memory and used > r.memory:
                killed[job_id] = f"exceeded --job-memory {format_size(r.memory)} (used {format_size(used)})"
        for job_id in killed:
            self.killed.add(job_id)
            signal_group(int(job_id), signal.SIGKILL)
        return killed

    def record(self, job_id: str) -> dict[str, Any]:
        """Its pid: a restarted daemon finds the process (if it is still alive) by its job lock."""
        return {"pid": int(job_id)}

    def describe(self) -> str:
        return "local (forked)"
