"""The runner: starts queued jobs as processes, watches them, and records how each one ended.

A job runs in its own process (forked from a server that has torch imported, in its own session)
so a crash cannot take the daemon down; `run_pipeline` checkpoints every epoch, so a job
interrupted in any way is simply started again and resumes. The runner holds every job to
--job-memory and --job-timeout (see dsrpipe.watch.limits): one over a limit is killed and failed
with that cause.
"""

from __future__ import annotations

import json
import os
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
from ..executors.processes import ForkServer, signal_group
from ..files import disk_full, shown
from ..quantities import format_size
from ..rundir import RunDir
from .drops import ERROR_SUFFIX
from .folder import DropFolder, log, try_lock
from .limits import group_memory
from .options import WatchOptions

MAX_ATTEMPTS = 10  # starts of one job (each interruption costs one) before it is failed
STOP_TIMEOUT = 30.0  # seconds a job gets to stop on SIGTERM before SIGKILL
LIMITS_PERIOD = (
    0.5  # seconds between two looks at the jobs' memory and time (a look costs ~1 ms per 20 processes)
)
BUSY_WAIT = 5.0  # seconds before a job found busy (an orphan not yet gone) is tried again
# A job stopped by a signal (its own exit code, or killed by it), or 255: the fork server died.
INTERRUPTED = {EXIT_INTERRUPTED, EXIT_TERMINATED, -signal.SIGTERM, -signal.SIGINT, 255}
# Imported once by the fork server, so that a job process starts in milliseconds, not seconds
# (the server skips any that fail to import: the job then imports them itself); last, the
# warm-up, which runs once what the jobs would each set up on first use.
PRELOAD = [
    "dsrpipe.watch.job",
    "dsrpipe.pipeline",
    "sklearn.datasets",
    "sklearn.model_selection",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "onnxscript",
    "torch.onnx._internal.exporter._core",
    "dsrpipe.watch.warmup",
]


@dataclass
class _Running:
    proc: Any  # a multiprocessing.Process (None for an engine's job)
    job: dict[str, Any]
    started: float  # monotonic
    killed: str | None = None  # why the runner killed it (a limit), if it did
    announced: bool = False  # its pid is in the journal and its `running` line logged
    ended: float | None = None  # monotonic, when its end was first seen (recorded later if the disk is full)
    engine_job: str | None = None  # the engine's id of the job (--executor ray|slurm)
    # Its engine lost it, but a live process (this pid) still holds its job lock: it stays
    # `running` until the lock is free, then is queued again.
    held_by: int | None = None


class Runner:
    def __init__(
        self,
        folder: DropFolder,
        opts: WatchOptions,
        stopping: Callable[[], bool],
        executor: Executor | None = None,
    ):
        self.folder, self.opts, self.stopping = folder, opts, stopping
        self.executor = executor  # None: jobs are processes forked here; else the engine's jobs
        self.running: dict[int, _Running] = {}
        self.hold: dict[int, float] = {}  # job id -> not before (monotonic)
        self.forks = ForkServer(PRELOAD)
        self._next_look = 0.0
        self._waiting: set[int] = set()  # jobs whose start waits for another process to free their lock
        self._engine_busy = False  # jobs of this daemon's may be on the engine (its actor is needed)

    def recover(self) -> None:
        """Jobs left `running` by a daemon that died: an engine's job is re-attached (never
        submitted twice); a lost one, or a local process still at it (stopped first), is requeued."""
        for job in self.folder.journal.jobs("running"):
            engine_job = job.get("engine_job")
            address = job.get("engine_address")
            elsewhere = address is not None and self.executor is not None and address != self.executor.address
            if engine_job and (
                self.executor is None
                or job["engine"] != self.executor.name
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
                    self.running[job["id"]] = _Running(
                        None, job, time.monotonic(), announced=True, engine_job=engine_job
                    )
                    self.folder.event(
                        job["name"], "reattached", id=job["id"], engine=job["engine"], engine_job=engine_job
                    )
                    continue
            else:
                self._stop_orphan(job)
            if engine_job:  # the engine lost it (its node died, it was cancelled outside)
                self._lost(job, engine_job)
                continue
            RunDir(job["out"], job["name"]).sweep()
            self.folder.journal.update(job["id"], state="queued", pid=None)
            self.folder.event(
                job["name"],
                "queued",
                id=job["id"],
                reason="was running when the daemon stopped; resumes from its last checkpoint",
            )

    def warm_up(self) -> None:
        """Start the fork server (it imports torch & co.) now, while a queued drop waits its turn."""
        if self.executor is None:
            self.forks.warm_up()

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
            code = r.proc.exitcode if r.engine_job is None else self.executor.poll(r.engine_job)
            if code == LOST:
                del self.running[job_id]
                self._lost(r.job, r.engine_job)
            elif code is not None:
                r.ended = r.ended or time.monotonic()
                self._finished(r, code)
                del self.running[job_id]
                if r.proc is not None:
                    r.proc.close()
        self._release_engine()
        self.enforce_limits()

    def _lost(self, job: dict[str, Any], engine_job: str | None) -> None:
        """The engine says it no longer knows the job (its node died, it was cancelled outside):
        queued again, within MAX_ATTEMPTS, to resume from its last checkpoint; unless a live
        process still holds the job's lock (the job runs on, where its engine cannot tell):
        then it stays `running` until the lock is free (see poll)."""
        holder = self._lock_holder(job)
        if holder is not None:
            self.running[job["id"]] = _Running(None, job, time.monotonic(), announced=True, held_by=holder)
            return self.folder.event(
                job["name"],
                "running",
                id=job["id"],
                pid=holder,
                reason=f"{self.executor.name} lost job {engine_job}, but process {holder} still holds the "
                "job; it is queued again once that process has ended",
            )
        RunDir(job["out"], job["name"]).sweep()
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
        if not self._engine_busy or any(r.engine_job for r in self.running.values()):
            return
        if self.folder.journal.jobs("queued"):
            return
        self._engine_busy = False
        self.executor.shutdown()

    def enforce_limits(self) -> None:
        """Kill the jobs over --job-memory or --job-timeout (a look every LIMITS_PERIOD seconds)."""
        if time.monotonic() >= self._next_look:
            self._next_look = time.monotonic() + LIMITS_PERIOD
            self._enforce_limits()

    def shutdown(self, kill_now: Callable[[], bool]) -> None:
        """Stop the running jobs (SIGTERM, then SIGKILL after STOP_TIMEOUT or a second signal)."""
        if self.executor is not None:
            self._leave_engine()
            return
        if not self.running:
            return
        log.info(
            f"stopping {len(self.running)} running job(s); they resume from their last checkpoint "
            "on the next start"
        )
        for r in self.running.values():
            signal_group(r.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.running and time.monotonic() < deadline and not kill_now():
            time.sleep(0.1)
            self._poll_stopping()
        for r in self.running.values():
            signal_group(r.proc.pid, signal.SIGKILL)
            r.proc.join(10)
        self._poll_stopping()  # anything still listed stays `running`: the next start deals with it

    def _leave_engine(self) -> None:
        """At the daemon's end: an engine's jobs go on, and the next start re-attaches them;
        those of a local Ray of the daemon's own stop with it, and the next start queues them
        again. With no job left, what the engine held for the daemon goes."""
        running = [r for r in self.running.values() if r.engine_job]
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
                    f"stopping {len(running)} job(s) with the daemon's {self.executor.describe()}; they "
                    "resume from their last checkpoint on the next start"
                )
        finally:
            self.running.clear()
            self.executor.close()

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
                if r.proc.exitcode is not None:
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
            RunDir(Path(job["out"]), job["name"]).clear()
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
        if self.executor is not None:
            # Its output goes to the job's log, as a local job's does (and from there to the error file).
            spec = JobSpec(
                job["name"],
                "dsrpipe.watch",
                [str(job_dir), json.dumps(self._job_settings())],
                job_dir / "job.log",
            )
            self._engine_busy = True
            engine_job = self.executor.submit(spec)
            self.folder.journal.update(
                job["id"],
                engine=self.executor.name,
                engine_job=engine_job,
                engine_address=self.executor.address,
            )
            r = self.running[job["id"]] = _Running(
                None, {**job, "attempts": attempt}, time.monotonic(), engine_job=engine_job
            )
            return self._announce(r)
        # Here, not at the top: the job module imports torch, which the daemon never does (the
        # fork server has it preloaded; this process only names the function to run there).
        from .job import job_process

        proc = self.forks.start(
            job_process, (str(job_dir), self._job_settings()), f"dsrpipe-job-{job['name']}"
        )
        r = self.running[job["id"]] = _Running(proc, {**job, "attempts": attempt}, time.monotonic())
        self._announce(r)

    def _announce(self, r: _Running) -> None:
        """The started job's pid (or engine job id) into the journal, and its `running` line."""
        r.announced = True
        if r.engine_job is not None:
            return self.folder.event(
                r.job["name"],
                "running",
                id=r.job["id"],
                attempt=r.job["attempts"],
                engine=self.executor.name,
                engine_job=r.engine_job,
            )
        self.folder.journal.update(r.job["id"], pid=r.proc.pid)
        self.folder.event(r.job["name"], "running", id=r.job["id"], attempt=r.job["attempts"], pid=r.proc.pid)

    def _job_settings(self) -> dict[str, Any]:
        workers = self.opts.workers
        nproc = self.opts.nproc_per_job
        threads = (
            None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // (workers * nproc))
        )
        return {
            "threads": threads,
            "max_unpacked": self.opts.max_unpacked,
            "max_files": self.opts.max_files,
            "nproc": nproc,
        }

    def _enforce_limits(self) -> None:
        live = [r for r in self.running.values() if r.killed is None and r.proc is not None]
        # A job's pid is its process group: it starts its own session.
        usage = group_memory(r.proc.pid for r in live) if self.opts.job_memory else {}
        for r in live:
            used = usage.get(r.proc.pid, 0)
            if self.opts.job_timeout and time.monotonic() - r.started > self.opts.job_timeout:
                self._kill(r, f"exceeded --job-timeout {self.opts.job_timeout:g}s")
            elif self.opts.job_memory and used > self.opts.job_memory:
                self._kill(
                    r, f"exceeded --job-memory {format_size(self.opts.job_memory)} (used {format_size(used)})"
                )

    def _kill(self, r: _Running, cause: str) -> None:
        r.killed = cause
        signal_group(r.proc.pid, signal.SIGKILL)
        self.folder.event(r.job["name"], "killing", id=r.job["id"], pid=r.proc.pid, reason=cause)

    def _finished(self, r: _Running, code: int) -> None:
        job, seconds = r.job, (r.ended or time.monotonic()) - r.started
        job_dir = self.folder.job_dir(job)
        RunDir(job["out"], job["name"]).sweep()  # what validate had made, if the job was killed in it
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
