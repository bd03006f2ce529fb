"""The local executor: every job a process (or a torchrun job) on this machine, as `compare`
always ran them. Ids are process ids; a job does not outlive the submitter's attention (Ctrl-C
reaches it through the terminal's process group)."""

from __future__ import annotations

import subprocess

from . import launch
from .base import LOST, Executor, JobSpec, Resources, cores

STOP_WAIT = 30.0  # seconds an interrupted job gets to checkpoint before it is killed


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, resources: Resources, jobs: int = 1):
        super().__init__(resources)
        self.jobs = jobs
        self.processes: dict[str, tuple[subprocess.Popen, object]] = {}

    def threads(self) -> int:
        """Share the cores instead of every process spinning up one thread per core."""
        processes = self.jobs * self.resources.nproc
        return max(1, cores() // processes)

    def submit(self, spec: JobSpec) -> str:
        process, handle = launch.start(spec, self.resources.nproc, self.threads())
        job_id = str(process.pid)
        self.processes[job_id] = (process, handle)
        return job_id

    def poll(self, job_id: str) -> int | str | None:
        if job_id not in self.processes:
            return LOST
        process, handle = self.processes[job_id]
        code = process.poll()
        if code is not None:
            handle.close()
        return code

    def cancel(self, job_id: str) -> None:
        """Ctrl-C has reached the job already (same terminal): give it time to save, then stop it."""
        process, handle = self.processes[job_id]
        try:
            process.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        handle.close()
