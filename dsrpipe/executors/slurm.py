"""The Slurm executor, through submitit: each job an sbatch job with its partition, time, GPUs,
CPUs and memory; DDP through tasks_per_node (one `dsrpipe run` rank per task, torch's env://
variables from submitit). Preemption and timeouts requeue the job (submitit's checkpointing:
`checkpoint()` returns the same job), which resumes from its run folder's checkpoint.

`cluster: local` runs the jobs on this machine through submitit's local executor (tests, a
workstation). `--dry-run` prints the sbatch script and submits nothing. Without the extra
(`submitit` not installed), --executor slurm is one line naming the pip command.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import signal
import stat
import sys
from pathlib import Path

try:
    import submitit
except ImportError:  # the optional extra [slurm]: an executor made without it names the pip command
    submitit = None

from ..errors import EXIT_INTERRUPTED, UserError
from ..files import shown
from . import launch
from .base import LOST, PROBE_ENV, Executor, JobSpec, Resources, missing_extra, write_marker
from .processes import children

DEFAULT_TIME_MIN = 60 * 24  # a job's time limit when none is given, in minutes
MAX_TIMEOUTS = 3  # requeues after a timeout (preemptions requeue without limit, as submitit does)


def _submitit():
    """submitit, or the one line naming the extra where it is not installed."""
    if submitit is None:
        raise missing_extra("slurm")
    return submitit


def private_folder(folder: Path) -> None:
    """submitit's folder holds the jobs' pickles, which this process and the workers load: it
    must be this user's alone (made 0700 when new; else owned by this user, not a link, and
    writable by no one else). One line naming it otherwise."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise UserError(f"cannot create the Slurm jobs' folder {shown(folder)}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise UserError(
            f"the Slurm jobs' folder {shown(folder)} must be a folder of this user's that no one else "
            "can write: it holds the jobs' pickles, which are loaded to run them"
        )


def script_value(what: str, value: str) -> str:
    """`value`, shell-quoted, for the sbatch script; a one-line UserError if it holds a line break
    or another control character (whatever str.isprintable refuses, as for class names: Unicode
    line separators and format characters, which a reader of the script would not see, too).
    Quoting alone does not do: an `#SBATCH --error='...'` line is a comment to bash, so a line
    break inside its quotes ends it, and bash runs the rest of the value ($(...), backticks and
    all) as commands of the job."""
    if not value.isprintable():
        raise UserError(
            f"{what} {shown(value)} holds a line break or another control character, which cannot "
            "go into an sbatch script"
        )
    return shlex.quote(value)


class SlurmTask:
    """What submitit pickles and runs on the node: the job's command, to its end."""

    def __init__(self, spec: JobSpec, threads: int, ranks: int):
        self.spec, self.threads, self.ranks = spec, threads, ranks

    def __call__(self) -> int:
        spec = self.spec
        if self.ranks > 1:  # one rank per Slurm task: torch.distributed's env:// from submitit
            dist = _submitit().helpers.TorchDistributedEnvironment().export()
            spec = JobSpec(spec.name, spec.module, spec.args, spec.log, {**spec.env}, spec.cwd)
            spec.env.update(LOCAL_WORLD_SIZE=str(dist.local_world_size))
        return launch.run_to_end(spec, 1, self.threads)

    def checkpoint(self, *args, **kwargs):
        """Preempted or out of time: submit the same job again; it resumes from the run folder."""
        return _submitit().helpers.DelayedSubmission(self, *args, **kwargs)


class SlurmExecutor(Executor):
    name = "slurm"
    remote = True

    def __init__(
        self,
        resources: Resources,
        folder: Path,
        *,
        local: bool = False,
        tasks_per_node: int = 1,
        dry_run: bool = False,
    ):
        super().__init__(resources)
        submitit = self.submitit = _submitit()
        if tasks_per_node < 1:
            raise UserError(f"tasks_per_node must be at least 1, got {tasks_per_node}")
        self.folder, self.local, self.tasks = Path(folder), local, tasks_per_node
        # Before anything is written or submitted: what the sbatch script will hold is fit for it.
        for what, value in self._script_values().items():
            script_value(what, value)
        if not local and not dry_run and shutil.which("sbatch") is None:
            raise UserError(
                "--executor slurm: no sbatch on this machine's PATH; submit from a Slurm login node, "
                "or set `cluster: local` to run the jobs here through submitit"
            )
        self.jobs: dict[str, object] = {}
        if dry_run:  # nothing is submitted: no Slurm needed to write the script
            return
        private_folder(self.folder)
        minutes = math.ceil(resources.time / 60) if resources.time else DEFAULT_TIME_MIN
        if local:
            self.executor = submitit.LocalExecutor(self.folder)
            self.executor.update_parameters(
                timeout_min=minutes, gpus_per_node=resources.gpus, tasks_per_node=tasks_per_node
            )
        else:
            self.executor = submitit.SlurmExecutor(self.folder, max_num_timeout=MAX_TIMEOUTS)
            self.executor.update_parameters(**self.parameters())

    def parameters(self) -> dict:
        """sbatch's parameters, as submitit's SlurmExecutor takes them."""
        r = self.resources
        params = {
            "job_name": "dsrpipe",
            "time": math.ceil(r.time / 60) if r.time else DEFAULT_TIME_MIN,
            "cpus_per_task": r.cpus,
            "ntasks_per_node": self.tasks,
            "nodes": 1,
        }
        if r.gpus:
            params["gpus_per_node"] = r.gpus
        if r.partition:
            params["partition"] = r.partition
        if r.memory:
            params["mem"] = f"{max(1, r.memory // 2**20)}M"
        return params

    def _script_values(self) -> dict[str, str]:
        """Every value of ours that the sbatch script holds, by what a message calls it: the
        folder as submitit writes it (absolute: the working directory's name goes in too), this
        Python, and the text parameters (a partition was checked against its rule already)."""
        values = {"the Slurm jobs' folder (in --out)": str(self._absolute()), "this Python": sys.executable}
        for key, value in self.parameters().items():
            values[f"the sbatch parameter {key}"] = str(value)
        return values

    def _task(self, spec: JobSpec) -> SlurmTask:
        return SlurmTask(spec, self.resources.cpus, self.tasks)

    def submit(self, spec: JobSpec) -> str:
        job = self.executor.submit(self._task(spec))
        self.jobs[str(job.job_id)] = job
        return str(job.job_id)

    def _job(self, job_id: str):
        job = self.jobs.get(job_id)
        if job is None and not self.local:  # a job a previous submitter started
            job = self.jobs[job_id] = self.submitit.SlurmJob(self.folder, job_id)
        return job

    def poll(self, job_id: str):
        job = self._job(job_id)
        if job is None:
            return LOST
        if not job.done():
            return None
        try:
            return int(job.result())
        except self.submitit.core.utils.UncompletedJobError:
            state = str(job.state)
            return EXIT_INTERRUPTED if state.startswith("PREEMPT") else LOST
        except Exception:  # the task raised: its log says why
            return 1

    def cancel(self, job_id: str) -> None:
        job = self._job(job_id)
        if job is None:
            return
        controller = getattr(job, "_process", None)  # `cluster: local`: submitit's controller process
        if self.local and controller is not None and (tasks := children(controller.pid)):
            # submitit cancels a local job with SIGINT to its controller, which then dies on a
            # KeyboardInterrupt with a traceback on our stderr (it inherits it); interrupting its
            # tasks instead lets it see them end and exit quietly, as scancel would.
            for pid in tasks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
            return
        job.cancel(check=False)

    def probe(self, folder: Path, token: str):
        job = self.executor.submit(write_marker, str(folder), token, os.environ.get(PROBE_ENV))
        try:
            return job.result()
        except Exception:
            return 1

    def dry_run(self, spec: JobSpec) -> str:
        """The sbatch script that submit() would hand to Slurm (rendered by submitit, which quotes
        each #SBATCH value and srun argument with shlex.quote; the command is quoted here as
        submitit quotes its own). Every value was checked by script_value when this executor was made."""
        from_submitit = self.submitit.slurm.slurm._make_sbatch_string
        folder = self._absolute()
        command = " ".join(
            [shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))]
        )
        return from_submitit(command=command, folder=folder, **self.parameters())

    def _absolute(self) -> Path:
        """The jobs' folder as submitit's executor holds it, and writes it into the script."""
        return self.folder.expanduser().absolute()

    def describe(self) -> str:
        return "slurm (local, through submitit)" if self.local else "slurm"
