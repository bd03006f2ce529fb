"""The Ray executor: each job a Ray task asking for its CPUs, GPUs and memory, retried by Ray
(`max_retries`, `retry_exceptions`); a retried job resumes from its run folder's checkpoint.

The tasks are submitted by a small detached actor (no CPU of its own) that the submitter names:
a task is owned by whoever submits it, so tasks that a `compare` or a `watch` daemon submitted
themselves would die with it; the actor's outlive them, and a restarted daemon re-attaches to
its actor by name and to each job by its id, `<actor>/<key>`. `compare` removes its actor when
it is done (and cancels its jobs on Ctrl-C); a daemon's stays with its jobs.

Without --address dsrpipe starts a local Ray in its own process, every listener on 127.0.0.1
(docs/security.md): the node address is 127.0.0.1, Ray's cluster mode that resolves it to the
host's address is off, and the dashboard is not started. With --address it joins that cluster.
`ray` is imported on use: without the extra, --executor ray is one line naming the pip command.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, UserError
from . import launch
from .base import LOST, PROBE_ENV, PROBE_TIMEOUT, Executor, JobSpec, Resources, missing_extra, write_marker

NAMESPACE = "dsrpipe"
MAX_RETRIES = 3  # Ray's own retries of a job whose worker died or that was interrupted
LOOPBACK = "127.0.0.1"
# Without these a local Ray resolves 127.0.0.1 to the host's address and listens there.
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
CONNECT_TIMEOUT = 5.0  # seconds to reach --address before it is said unreachable


class JobInterrupted(Exception):
    """The job's processes were stopped by a signal (a preempted node, a stopping worker): Ray
    retries the task (retry_exceptions), which resumes from the checkpoint."""


def _ray():
    try:
        import ray  # the optional extra: imported on use
    except ImportError:
        raise missing_extra("ray") from None
    return ray


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def start_local(cpus: int | None = None, gpus: int | None = None) -> str:
    """A local Ray in this process, on loopback only; its GCS address (for --address)."""
    os.environ.update(LOCAL_ENV)  # before Ray is imported (it reads them then); its processes inherit them
    ray = _ray()
    if not ray.is_initialized():
        ray.init(
            num_cpus=cpus,
            num_gpus=gpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            namespace=NAMESPACE,
            log_to_driver=False,
            configure_logging=False,
        )
    return ray.get_runtime_context().gcs_address


def connect(address: str | None) -> None:
    """Join the cluster at `address` (host:port of its GCS, or `auto`), or start a local one.
    An address that does not answer is one line, before Ray waits for it at length."""
    if address is None:
        start_local()
        return
    node = {}
    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--address {address}: expected host:port of the Ray cluster's head (or auto)")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
        except OSError as exc:
            raise UserError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None
        if host.strip("[]") in ("127.0.0.1", "localhost", "::1"):  # a local Ray: this driver on loopback too
            os.environ.update(LOCAL_ENV)
            node = {"_node_ip_address": LOOPBACK}
    ray = _ray()
    if ray.is_initialized():  # a caller of the API that joined a cluster already
        joined = ray.get_runtime_context().gcs_address
        if address not in ("auto", joined):
            raise UserError(
                f"--address {address}: this process has joined the Ray cluster at {joined} already"
            )
        return
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False, **node)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(
            f"cannot join the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}"
        ) from None


def run_job(spec: JobSpec, nproc: int, threads: int, time_limit: float | None) -> int:
    """The task: the job's command to its end, on the worker. Killed by a signal: retried."""
    code = launch.run_to_end(spec, nproc, threads, time_limit)
    if code < 0 or code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        raise JobInterrupted(f"{spec.name}: exit {code}")
    return code


class Supervisor:
    """The detached actor that submits and owns a submitter's tasks (see the module docstring)."""

    def __init__(self):
        self.refs = {}

    def submit(self, key: str, spec: JobSpec, options: dict, nproc: int, threads: int, limit) -> None:
        ray = _ray()
        task = ray.remote(run_job).options(
            max_retries=MAX_RETRIES, retry_exceptions=[JobInterrupted], name=spec.name, **options
        )
        self.refs[key] = task.remote(spec, nproc, threads, limit)

    def poll(self, key: str):
        ray = _ray()
        ref = self.refs.get(key)
        if ref is None:
            return LOST
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return None
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, JobInterrupted):  # its retries are spent
                return EXIT_INTERRUPTED
            return LOST
        except ray.exceptions.RayError:  # cancelled, its worker or node lost for good
            return LOST

    def cancel(self, key: str) -> None:
        ref = self.refs.get(key)
        if ref is not None:
            _ray().cancel(ref, force=True)

    def forget(self, key: str) -> None:
        self.refs.pop(key, None)


class RayExecutor(Executor):
    name = "ray"
    remote = True

    def __init__(self, resources: Resources, owner: str, address: str | None = None):
        super().__init__(resources)
        self.started = address is None and not _ray_started()  # a local Ray of its own
        connect(address)  # first: it sets what Ray reads when it is imported
        ray = self.ray = _ray()
        self.address, self.owner = address, owner
        if resources.gpus and not ray.cluster_resources().get("GPU"):
            raise UserError(f"--gpus-per-job {resources.gpus}: the Ray cluster has no GPUs")
        self.actor = (
            ray.remote(Supervisor)
            .options(
                name=owner,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=4,
            )
            .remote()
        )

    def _options(self) -> dict:
        r = self.resources
        options = {"num_cpus": r.cpus, "num_gpus": r.gpus}
        if r.memory:
            options["memory"] = r.memory
        return options

    def submit(self, spec: JobSpec) -> str:
        key = f"{spec.name}-{os.getpid()}-{time.time_ns()}"
        self.ray.get(
            self.actor.submit.remote(
                key, spec, self._options(), self.resources.nproc, self.resources.cpus, self.resources.time
            )
        )
        return f"{self.owner}/{key}"

    def _call(self, method: str, job_id: str):
        owner, _, key = job_id.partition("/")
        if owner != self.owner:
            return LOST
        try:
            return self.ray.get(getattr(self.actor, method).remote(key), timeout=60)
        except self.ray.exceptions.RayActorError:
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

    def describe(self) -> str:
        return f"ray ({self.address or 'local, 127.0.0.1'})"

    def shutdown(self) -> None:
        """compare, done: its actor goes (its jobs have ended or were cancelled), and a local Ray with it."""
        try:
            self.ray.kill(self.actor)
        except Exception:
            pass
        if self.started:
            self.ray.shutdown()
