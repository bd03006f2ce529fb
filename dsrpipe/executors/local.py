"""The local executor of a command that waits for its jobs (`compare`): every job a process (or
a torchrun job) started fresh on this machine. Ids are process ids; a job does not outlive the
submitter's attention (Ctrl-C reaches it through the terminal's process group). The watch
daemon's local jobs are forked from a warm server instead (forkserver.py)."""

from __future__ import annotations

import subprocess

from . import launch
from .base import LOST, Executor, JobSpec, Resources, threads_per_job


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, resources: Resources, jobs: int = 1):
        super().__init__(resources)
        self.jobs = jobs
        self.processes: dict[str, subprocess.Popen] = {}

    def submit(self, spec: JobSpec) -> str:
        process = launch.start(spec, self.resources.nproc, threads_per_job(self.jobs, self.resources.nproc))
        job_id = str(process.pid)
        self.processes[job_id] = process
        return job_id

    def poll(self, job_id: str) -> int | str | None:
        if job_id not in self.processes:
            return LOST
        return self.processes[job_id].poll()

    def cancel(self, job_id: str) -> None:
        """Ctrl-C has reached the job already (same terminal): give it time to save, then stop it."""
        process = self.processes[job_id]
        try:
            process.wait(timeout=launch.STOP_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
