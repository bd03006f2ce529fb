"""The runner: hands queued jobs to the executor, watches them, and records how each one ended.

A job is `python -m dsrpipe.jobs <job folder>`, whatever runs it: the local executor forks it from
a warm server that has the job's modules (PRELOAD) imported, in a session of its own; Ray and
Slurm run it on a worker. Either way a crash cannot take the daemon down, and `run_pipeline`
checkpoints every epoch, so a job interrupted in any way is simply started again and resumes.
Each job is held to --job-memory and --job-timeout by its executor (the local one kills it; an
engine holds it to what it asked for): one over a limit fails with that cause.

The daemon names the job's module and never imports it: it imports torch.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import files
from ..errors import (
    EXIT_BUSY,
    EXIT_DISK_FULL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    EXIT_VALIDATION,
    UserError,
)
from ..executors.base import LOST, Executor, JobSpec, connection_refused
from ..executors.processes import signal_group
from ..files import disk_full, shown
from ..runfolder import RunFolder
from .drops import ERROR_SUFFIX
from .folder import DropFolder, log, try_lock
from .options import WatchOptions

MAX_ATTEMPTS = 10  # starts of one job (each interruption costs one) before it is failed
STOP_TIMEOUT = 30.0  # seconds a job gets to stop on SIGTERM before SIGKILL
LIMITS_PERIOD = (
    0.5  # seconds between two looks at the jobs' memory and time (a look costs ~1 ms per 20 processes)
)
BUSY_WAIT = 5.0  # seconds before a job found busy (an orphan not yet gone) is tried again
# A job stopped by a signal (its own exit code, or killed by it), or 255: the fork server died.
INTERRUPTED = {EXIT_INTERRUPTED, EXIT_TERMINATED, -signal.SIGTERM, -signal.SIGINT, 255}
JOB_MODULE = "dsrpipe.jobs"  # a job: python -m dsrpipe.jobs <job folder> [settings as JSON]
# Imported once by the local executor's fork server, so that a job process starts in
# milliseconds, not seconds (the server skips any that fail to import: the job then imports them
# itself); last, the warm-up, which runs once what the jobs would each set up on first use.
PRELOAD = [
    "dsrpipe.jobs.job",
    "dsrpipe.pipeline",
    "sklearn.datasets",
    "sklearn.model_selection",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "onnxscript",
    "torch.onnx._internal.exporter._core",
    "dsrpipe.jobs.warmup",
]


@dataclass
class _Running:
    job: dict[str, Any]
    started: float  # monotonic
    handle: str | None = None  # the executor's id of the job (None: see held_by)
    killed: str | None = None  # why its executor killed it (a limit), if it did
    announced: bool = False  # its id is in the journal and its `running` line logged
    ended: float | None = None  # monotonic, when its end was first seen (recorded later if the disk is full)
    # Its executor lost it, but a live process (this pid) still holds its job lock: it stays
    # `running` until the lock is free, then is queued again.
    held_by: int | None = None


class Runner:
    def __init__(
        self,
        folder: DropFolder,
        opts: WatchOptions,
        stopping: Callable[[], bool],
        executor: Executor,
    ):
        self.folder, self.opts, self.stopping = folder, opts, stopping
        self.executor = executor
        self.running: dict[int, _Running] = {}
        self.hold: dict[int, float] = {}  # job id -> not before (monotonic)
        self._next_look = 0.0
        self._waiting: set[int] = set()  # jobs whose start waits for another process to free their lock
        self._engine_busy = False  # jobs of this daemon's may be on the engine (its actor is needed)

    def recover(self) -> None:
        """Jobs left `running` by a daemon that died: an engine's job is re-attached (never
        submitted twice); a lost one, or a local process still at it (stopped first), is requeued."""
        for job in self.folder.journal.jobs("running"):
            engine_job = job.get("engine_job")
            address = job.get("engine_address")
            elsewhere = address is not None and address != self.executor.address
            if engine_job and (
                job["engine"] != self.executor.name
                or (elsewhere and connection_refused(address) is None)  # a cluster that is gone lost it
            ):
                # it may still run there, and its job lock's pid is a worker's, maybe on another machine
                where = f" at {address}" if address else ""
                raise UserError(
                    f"job {shown(job['name'])} runs on {job['engine']}{where} (job {engine_job}): restart "
                    f"the daemon with --executor {job['engine']}{' --address ' + address if address else ''} "
                    "to re-attach it"
                )
            if engine_job:
                self._engine_busy = True
                if self.executor.attach(engine_job):
                    self.running[job["id"]] = _Running(job, time.monotonic(), engine_job, announced=True)
                    self.folder.event(
                        job["name"], "reattached", id=job["id"], engine=job["engine"], engine_job=engine_job
                    )
                    continue
            else:
                self._stop_orphan(job)
            if engine_job:  # the engine lost it (its node died, it was cancelled outside)
                self._lost(job, engine_job)
                continue
            RunFolder(job["out"], job["name"]).sweep()
            self.folder.journal.update(job["id"], state="queued", pid=None)
            self.folder.event(
                job["name"],
                "queued",
                id=job["id"],
                reason="was running when the daemon stopped; resumes from its last checkpoint",
            )

    def warm_up(self) -> None:
        """Get the executor ready (the local one's fork server imports torch & co.) now, while a
        queued drop waits its turn."""
        self.executor.warm_up()

    def start_jobs(self) -> None:
        now = time.monotonic()
        while not self.stopping() and len(self.running) < self.opts.workers:
            job = next(
                (
                    j
                    for j in self.folder.journal.jobs("queued")
                    if j["id"] not in self.running and self.hold.get(j["id"], 0) <= now
                ),
                None,
            )
            if job is None:
                return
            self._start(job)

    def poll(self) -> None:
        """Record the jobs that ended; kill those over a limit. A job leaves `running` only once
        how it ended is recorded: if the disk is full, the next poll records it."""
        for job_id, r in list(self.running.items()):
            if not r.announced:
                self._announce(r)
            if r.held_by is not None:  # lost, its lock still held: queued once it is free
                if self._lock_holder(r.job) is None:
                    del self.running[job_id]
                    self._lost(r.job, None)
                continue
            code = self.executor.poll(r.handle)
            if code == LOST:
                del self.running[job_id]
                self._lost(r.job, r.handle)
            elif code is not None:
                r.ended = r.ended or time.monotonic()
                self._finished(r, code)
                del self.running[job_id]
        self._release_engine()
        self.enforce_limits()

    def _lost(self, job: dict[str, Any], engine_job: str | None) -> None:
        """The engine says it no longer knows the job (its node died, it was cancelled outside):
        queued again, within MAX_ATTEMPTS, to resume from its last checkpoint; unless a live
        process still holds the job's lock (the job runs on, where its engine cannot tell):
        then it stays `running` until the lock is free (see poll)."""
        holder = self._lock_holder(job)
        if holder is not None:
            self.running[job["id"]] = _Running(job, time.monotonic(), announced=True, held_by=holder)
            return self.folder.event(
                job["name"],
                "running",
                id=job["id"],
                pid=holder,
                reason=f"{self.executor.name} lost job {engine_job}, but process {holder} still holds the "
                "job; it is queued again once that process has ended",
            )
        RunFolder(job["out"], job["name"]).sweep()
        self.folder.journal.update(job["id"], state="queued", pid=None, engine_job=None)
        lost = (
            f"{self.executor.name} lost job {engine_job}" if engine_job else "the process that held it ended"
        )
        self.folder.event(
            job["name"], "queued", id=job["id"], reason=f"{lost}; resumes from its last checkpoint"
        )

    def _lock_holder(self, job: dict[str, Any]) -> int | None:
        """The pid of the live process that holds the job's lock (0 if its file names none), or
        None if no process holds it."""
        lock_path = self.folder.job_dir(job) / "job.lock"
        try:
            with open(lock_path, "a+") as f:
                if try_lock(f):
                    return None
        except FileNotFoundError:
            return None
        return files.lock_holder(lock_path) or 0

    def _release_engine(self) -> None:
        """No job of this daemon's is left on the engine, and none waits for it: what the engine
        holds for the daemon (Ray: its actor) goes, until the next job."""
        if not self._engine_busy or any(r.handle for r in self.running.values()):
            return
        if self.folder.journal.jobs("queued"):
            return
        self._engine_busy = False
        self.executor.shutdown()

    def enforce_limits(self) -> None:
        """The executor kills the jobs over --job-memory or --job-timeout (a look every
        LIMITS_PERIOD seconds); each fails with that cause once it has ended."""
        if time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + LIMITS_PERIOD
        by_handle = {r.handle: r for r in self.running.values() if r.handle is not None}
        for handle, cause in self.executor.enforce_limits().items():
            r = by_handle[handle]
            r.killed = cause
            self.folder.event(r.job["name"], "killing", id=r.job["id"], **self._shown(handle), reason=cause)

    def shutdown(self, kill_now: Callable[[], bool]) -> None:
        """At the daemon's end: jobs that outlive it (an engine's) go on, and the next start
        re-attaches them; the others are stopped (SIGTERM, then SIGKILL after STOP_TIMEOUT or a
        second signal) and resume from their last checkpoint on the next start. With no job
        left, what the executor held for the daemon goes."""
        running = [r for r in self.running.values() if r.handle]
        try:
            if not running:
                self.executor.shutdown()
            elif self.executor.keeps_jobs:
                log.info(
                    f"leaving {len(running)} job(s) running on {self.executor.describe()}; "
                    "the next start re-attaches them"
                )
            else:
                log.info(
                    f"stopping {len(running)} running job(s) on {self.executor.describe()}; they resume "
                    "from their last checkpoint on the next start"
                )
                self._stop_jobs(kill_now)
        finally:
            self.running.clear()
            self.executor.close()

    def _stop_jobs(self, kill_now: Callable[[], bool]) -> None:
        for job_id, r in list(self.running.items()):
            if r.handle is None:  # its executor lost it to another process: the next start sees to it
                del self.running[job_id]
            else:
                self.executor.stop(r.handle)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.running and time.monotonic() < deadline and not kill_now():
            time.sleep(0.1)
            self._poll_stopping()
        for r in self.running.values():
            self.executor.kill(r.handle)
        self._poll_stopping()  # anything still listed stays `running`: the next start deals with it

    def _poll_stopping(self) -> None:
        """poll() while the daemon stops. If the disk is full, a job that has ended stays
        `running` in the journal, and the next start requeues it (it resumes, or finds its
        outputs complete)."""
        try:
            self.poll()
        except Exception as exc:
            if not disk_full(exc):
                raise
            for job_id, r in list(self.running.items()):
                if self.executor.poll(r.handle) is not None:
                    del self.running[job_id]

    # -- one job ----------------------------------------------------------------------------------

    def _start(self, job: dict[str, Any]) -> None:
        job_dir = self.folder.job_dir(job)
        holder = self._lock_holder(job)
        if holder is not None:  # started now, it would only find its lock taken: no attempt spent on that
            self.hold[job["id"]] = time.monotonic() + BUSY_WAIT
            if job["id"] not in self._waiting:
                self._waiting.add(job["id"])
                self.folder.event(
                    job["name"], "waiting", id=job["id"], pid=holder, reason="another process holds the job"
                )
            return None
        self._waiting.discard(job["id"])
        if job["attempts"] >= MAX_ATTEMPTS:
            return self.folder.fail(job, f"gave up after {job['attempts']} interrupted attempts", None, 0.0)
        if not (job_dir / "job.json").exists():
            return self.folder.fail(job, f"the job's files are missing from {job_dir}", None, 0.0)
        if job["fresh"] and job["attempts"] == 0:  # a --rerun starts over
            RunFolder(Path(job["out"]), job["name"]).clear()
            shutil.rmtree(job_dir / "cache", ignore_errors=True)
        attempt = job["attempts"] + 1
        # In this order, so that a full disk at any step leaves the job queued (nothing started)
        # or running and watched (see poll).
        files.append_text(
            job_dir / "job.log",
            f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} job {job['name']} (#{job['id']}) attempt {attempt} ===\n",
        )
        (job_dir / "cause.txt").unlink(missing_ok=True)
        self.folder.journal.update(
            job["id"],
            state="running",
            attempts=attempt,
            started=time.time(),
            pid=None,
            exit_code=None,
            finished=None,
        )
        # Its output goes to the job's log, wherever it runs (and from there to the error file).
        spec = JobSpec(
            job["name"], JOB_MODULE, [str(job_dir), json.dumps(self._job_settings())], job_dir / "job.log"
        )
        self._engine_busy = True
        handle = self.executor.submit(spec)
        r = self.running[job["id"]] = _Running({**job, "attempts": attempt}, time.monotonic(), handle)
        self._announce(r)

    def _announce(self, r: _Running) -> None:
        """The started job's executor id (a pid, or an engine's job) into the journal, and its
        `running` line."""
        self.folder.journal.update(r.job["id"], **self.executor.record(r.handle))
        r.announced = True
        self.folder.event(
            r.job["name"], "running", id=r.job["id"], attempt=r.job["attempts"], **self._shown(r.handle)
        )

    def _shown(self, handle: str) -> dict[str, Any]:
        """How the log names a job's process or engine job (the journal's record, less the address)."""
        return {k: v for k, v in self.executor.record(handle).items() if k != "engine_address"}

    def _job_settings(self) -> dict[str, Any]:
        return {
            "max_unpacked": self.opts.max_unpacked,
            "max_files": self.opts.max_files,
            "nproc": self.opts.nproc_per_job,
        }

    def _finished(self, r: _Running, code: int) -> None:
        job, seconds = r.job, (r.ended or time.monotonic()) - r.started
        job_dir = self.folder.job_dir(job)
        RunFolder(job["out"], job["name"]).sweep()  # what validate had made, if the job was killed in it
        if code == 0:  # cleaned up first: a job `done` in the journal is done with
            shutil.rmtree(job_dir / "cache", ignore_errors=True)
            (self.folder.drop / f"{job['name']}{ERROR_SUFFIX}").unlink(missing_ok=True)  # from an earlier run
            self.folder.journal.update(
                job["id"], state="done", exit_code=0, pid=None, finished=time.time(), cause=None
            )
            return self.folder.event(
                job["name"],
                "done",
                id=job["id"],
                duration=seconds,
                model=Path(job["out"]) / job["name"] / "model.onnx",
            )
        if r.killed:
            return self.folder.fail(job, r.killed, code, seconds)
        if code == 255:  # the fork server went away: its job may still be running
            self._stop_orphan(job)
        interrupted = code not in (EXIT_USER_ERROR, EXIT_VALIDATION, EXIT_DISK_FULL) and (
            self.stopping() or code in INTERRUPTED
        )
        if code == EXIT_BUSY or interrupted:
            self.folder.journal.update(job["id"], state="queued", pid=None, exit_code=code)
            if code == EXIT_BUSY:
                self.hold[job["id"]] = time.monotonic() + BUSY_WAIT
            return self.folder.event(
                job["name"],
                "queued",
                id=job["id"],
                duration=seconds,
                reason="interrupted; resumes from its last checkpoint",
            )
        try:
            cause = (job_dir / "cause.txt").read_text().strip()
        except OSError:
            cause = ""
        if not cause and code == EXIT_DISK_FULL:
            cause = (
                f"the disk is full: the job stopped, and could not even write why in {shown(job_dir)} "
                "(its log may end early); once there is space, drop it again under --rerun to run it again"
            )
        elif not cause:
            cause = (
                f"the job process was killed by {signal.Signals(-code).name}"
                if code < 0
                else f"the job process exited with code {code}"
            )
        self.folder.fail(job, cause, code, seconds)

    def _stop_orphan(self, job: dict[str, Any]) -> None:
        """A job process from an earlier daemon (or fork server) may still hold its job: stop it.
        Its job lock says whether it is alive, and holds its pid."""
        if not (self.folder.job_dir(job) / "job.lock").exists():
            return
        holder = self._lock_holder(job)
        if holder is None:
            return
        pid = holder or job["pid"]
        self.folder.event(
            job["name"],
            "stopping",
            id=job["id"],
            pid=pid,
            reason="a job process from an earlier daemon is still running",
        )
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 10.0)):
            if pid:
                signal_group(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self._lock_holder(job) is None:
                    return
                time.sleep(0.1)
        log.warning(f"job {job['name']}: process {pid} would not stop; its next attempt waits for it")
