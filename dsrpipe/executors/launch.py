"""dsrpipe's one launcher of a job's processes, on the machine that runs it: `python -m <module>
<args>`, or, for a dsrpipe command of several processes, that command under torchrun with every
listener on loopback (`python -m dsrpipe.torchrun`, named here and never imported: this module
stays torch-free, as the watch daemon that imports the executors does). The local executor
starts jobs here in the submitter; the Ray and Slurm executors in their workers; a watch job of
several processes its torchrun."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .base import JobSpec, job_env
from .processes import as_worker_child

TIMED_OUT = 124  # a job that ran past its time limit (as timeout(1) says it)
TORCHRUN = "dsrpipe.torchrun"
STOP_WAIT = 30.0  # seconds a job asked to stop gets to checkpoint before it is killed


def command(spec: JobSpec, nproc: int) -> list[str]:
    """The job's command line: through torchrun when it is a dsrpipe command of several processes."""
    if spec.module == "dsrpipe" and nproc > 1:
        return [sys.executable, "-m", TORCHRUN, str(nproc), *spec.args]
    return [sys.executable, "-m", spec.module, *spec.args]


def start(spec: JobSpec, nproc: int, threads: int, *, in_worker: bool = False) -> subprocess.Popen:
    """The job's processes, started. Its output goes to the end of its log."""
    log_file = Path(spec.log)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(
            f"\n$ python -m {spec.module} {' '.join(spec.args)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        log.flush()
        return subprocess.Popen(
            command(spec, nproc),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=job_env(spec, threads),
            cwd=spec.cwd,
            preexec_fn=as_worker_child if in_worker else None,
        )


def stop(process: subprocess.Popen) -> None:
    """Stop the job gently (SIGTERM: it checkpoints, torchrun passes it on to the ranks); killed
    after STOP_WAIT seconds."""
    process.terminate()
    try:
        process.wait(timeout=STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_to_end(spec: JobSpec, nproc: int, threads: int, time_limit: float | None = None) -> int:
    """Run the job where this is called (an engine's worker, a watch job) and return its exit
    code. The processes die with this one (a killed worker leaves no job behind); an exception
    here (the worker asked to stop) stops them first, gently, so that their last epoch is
    checkpointed."""
    process = start(spec, nproc, threads, in_worker=True)
    try:
        return process.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait()
        return TIMED_OUT
    except BaseException:
        stop(process)
        raise
