"""The Ray executor: each job a Ray task asking for its CPUs, GPUs and memory, retried by Ray
(`max_retries`, `retry_exceptions`); a retried job resumes from its run folder's checkpoint.

The tasks are submitted by a small detached actor (no CPU of its own) that the submitter names:
a task is owned by whoever submits it, so tasks that a `compare` or a `watch` daemon submitted
themselves would die with it; the actor's outlive them, and a restarted daemon re-attaches to
its actor by name and to each job by its id, `<actor>/<key>`. The actor is made by the first
submit and removed once its submitter has no job left (`shutdown`): `compare` when it is done
(it cancels its jobs on Ctrl-C first), a daemon whenever its last job has ended.

How the cluster is joined (every address checked first, or a local Ray of this process's own
started) is dsrpipe.executors.ray_cluster's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, UserError
from ..quantities import format_size
from . import launch
from .base import LOST, PROBE_ENV, PROBE_TIMEOUT, Executor, JobSpec, Resources, write_marker
from .ray_cluster import NAMESPACE, connect, import_ray, ray_started, stop_local

MAX_RETRIES = 3  # Ray's own retries of a job whose worker died or that was interrupted


# -- the jobs ---------------------------------------------------------------------------------------
class JobInterrupted(Exception):
    """The job's processes were stopped by a signal (a preempted node, a stopping worker): Ray
    retries the task (retry_exceptions), which resumes from the checkpoint."""

    def __init__(self, message: str, code: int):
        super().__init__(message, code)  # both: Ray pickles it to the caller by its args
        self.code = code


def run_job(spec: JobSpec, nproc: int, threads: int, time_limit: float | None) -> int:
    """The task: the job's command to its end, on the worker. Killed by a signal: retried."""
    code = launch.run_to_end(spec, nproc, threads, time_limit)
    if code < 0 or code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        raise JobInterrupted(f"{spec.name}: exit {code}", code)
    return code


class Supervisor:
    """The detached actor that submits and owns a submitter's tasks (see the module docstring)."""

    def __init__(self):
        self.refs = {}

    def submit(self, key: str, spec: JobSpec, options: dict, nproc: int, threads: int, limit) -> None:
        ray = import_ray()
        task = ray.remote(run_job).options(
            max_retries=MAX_RETRIES, retry_exceptions=[JobInterrupted], name=spec.name, **options
        )
        self.refs[key] = task.remote(spec, nproc, threads, limit)

    def poll(self, key: str):
        ray = import_ray()
        ref = self.refs.get(key)
        if ref is None:
            return LOST
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return None
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, JobInterrupted):  # stopped by a signal every time: its retries are spent
                return exc.cause.code
            return LOST
        except ray.exceptions.RayError:  # cancelled, its worker or node lost for good
            return LOST

    def cancel(self, key: str) -> None:
        ref = self.refs.get(key)
        if ref is not None:
            import_ray().cancel(ref, force=True)

    def forget(self, key: str) -> None:
        self.refs.pop(key, None)


def _fits(resources: Resources, address: str | None) -> None:
    """A job that no node of the cluster can hold would wait for ever: one line instead, naming
    what it asks for and what each node has."""
    ray = import_ray()
    r = resources
    wanted = {"CPU": r.cpus, "GPU": r.gpus, "memory": r.memory or 0}
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if any(all(node["Resources"].get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
        return

    def described(cpus, gpus, memory) -> str:
        return f"{cpus:g} CPUs, {gpus:g} GPUs, {format_size(int(memory))} memory"

    has = "; ".join(
        f"{node['NodeManagerAddress']} has "
        + described(*(node["Resources"].get(k, 0) for k in ("CPU", "GPU", "memory")))
        for node in nodes
    )
    asked = f"{r.cpus} CPUs, {r.gpus} GPUs" + (f", {format_size(r.memory)} memory" if r.memory else "")
    raise UserError(
        f"each job asks for {asked}, which no node of the Ray cluster at {address or 'local, 127.0.0.1'} "
        f"has: {has or 'it has no node'}"
    )


class RayExecutor(Executor):
    name = "ray"
    remote = True

    def __init__(self, resources: Resources, owner: str, address: str | None = None):
        super().__init__(resources)
        self.ray = import_ray()  # first: without the extra, nothing is started or asked
        self.started = address is None and not ray_started()  # a local Ray of its own
        # The cluster's address as joined (`auto` and 127.1 resolved), which a journal records;
        # None: a local Ray of this process's own, which stops with it.
        self.address = connect(address)
        self.owner = owner
        self._actor = None
        try:
            _fits(resources, self.address)
        except BaseException:
            self.close()
            raise

    def _supervisor(self, make: bool = False):
        """The submitter's actor: the one in the cluster under its name; made if `make`, else
        None where there is none (the cluster does not know its jobs)."""
        if self._actor is None:
            try:
                self._actor = self.ray.get_actor(self.owner, namespace=NAMESPACE)
            except ValueError:
                if not make:
                    return None
                self._actor = (
                    self.ray.remote(Supervisor)
                    .options(
                        name=self.owner,
                        namespace=NAMESPACE,
                        lifetime="detached",
                        get_if_exists=True,
                        num_cpus=0,
                        max_concurrency=4,
                    )
                    .remote()
                )
        return self._actor

    def _options(self) -> dict:
        r = self.resources
        options = {"num_cpus": r.cpus, "num_gpus": r.gpus}
        if r.memory:
            options["memory"] = r.memory
        return options

    def submit(self, spec: JobSpec) -> str:
        key = f"{spec.name}-{os.getpid()}-{time.time_ns()}"
        self.ray.get(
            self._supervisor(make=True).submit.remote(
                key, spec, self._options(), self.resources.nproc, self.resources.cpus, self.resources.time
            )
        )
        return f"{self.owner}/{key}"

    def _call(self, method: str, job_id: str):
        owner, _, key = job_id.partition("/")
        actor = self._supervisor() if owner == self.owner else None
        if actor is None:
            return LOST
        try:
            return self.ray.get(getattr(actor, method).remote(key), timeout=60)
        except self.ray.exceptions.RayActorError:
            self._actor = None
            return LOST

    def poll(self, job_id: str):
        result = self._call("poll", job_id)
        if result is not None:
            self._call("forget", job_id)
        return result

    def attach(self, job_id: str) -> bool:
        # poll() forgets a job that has ended: the submitter that re-attaches polls it next
        return self._call("poll", job_id) != LOST

    def cancel(self, job_id: str) -> None:
        self._call("cancel", job_id)

    def probe(self, folder: Path, token: str):
        task = self.ray.remote(write_marker).options(num_cpus=0, max_retries=0)
        try:
            return self.ray.get(
                task.remote(str(folder), token, os.environ.get(PROBE_ENV)), timeout=PROBE_TIMEOUT
            )
        except (self.ray.exceptions.RayError, OSError):
            return 1

    @property
    def keeps_jobs(self) -> bool:
        return not self.started  # a local Ray of its own stops with this process, and its jobs

    def describe(self) -> str:
        return f"ray ({self.address or 'local, 127.0.0.1'})"

    def shutdown(self) -> None:
        """No job of this submitter is left: its actor goes (the next submit makes it again)."""
        actor = self._supervisor()
        self._actor = None
        if actor is not None:
            try:
                self.ray.kill(actor)
            except Exception:  # gone already
                pass

    def close(self) -> None:
        """A local Ray of its own stops (its jobs with it); a cluster's jobs go on."""
        if self.started:
            stop_local()
