"""Starting one job's command as processes on the machine that runs it: `python -m <module>
<args>`, through torchrun (on loopback, see dsrpipe.distributed.Launch) when the job has several
processes. The local executor starts jobs here in the submitter; the Ray and Slurm executors in
their workers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ..distributed import Launch
from .base import JobSpec, job_env
from .processes import as_worker_child

TIMED_OUT = 124  # a job that ran past its time limit (as timeout(1) says it)


def start(spec: JobSpec, nproc: int, threads: int, *, in_worker: bool = False):
    """The job's processes, started: (Popen, Launch). Its output goes to the end of its log."""
    if spec.module == "dsrpipe":
        launch = Launch(nproc, spec.args)
    else:
        launch = Launch(1, [])
        launch.command = [sys.executable, "-m", spec.module, *spec.args]
    log_file = Path(spec.log)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(
            f"\n$ python -m {spec.module} {' '.join(spec.args)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        log.flush()
        process = subprocess.Popen(
            launch.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**job_env(spec, threads), **launch.env},
            cwd=spec.cwd,
            preexec_fn=as_worker_child if in_worker else None,
        )
    return process, launch


def run_to_end(spec: JobSpec, nproc: int, threads: int, time_limit: float | None = None) -> int:
    """Run the job where this is called (an engine's worker) and return its exit code. The
    processes die with this one (a killed worker leaves no job behind); an exception here (the
    worker asked to stop) stops them first, gently, so that their last epoch is checkpointed."""
    process, launch = start(spec, nproc, threads, in_worker=True)
    try:
        try:
            return process.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
            return TIMED_OUT
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    finally:
        launch.close()
