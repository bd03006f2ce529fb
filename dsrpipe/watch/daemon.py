"""The daemon: holds the drop folder's lock, and runs the loop that serves it (readiness →
intake → runner) until it is signalled (or, with --once, until nothing is left to do)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import DiskFull, UserError
from ..executors import Executor, Resources, make_executor
from ..executors import limits as local_limits
from ..executors.base import connection_refused
from ..files import disk_full, release_lock, shown, take_lock
from ..quantities import format_size
from .drops import JOURNAL_NAME, SLURM_DIR, STATE_DIR, TEMPLATE_NAME
from .folder import DropFolder, log
from .intake import Intake
from .journal import Journal
from .options import WatchOptions
from .readiness import Readiness
from .runner import PRELOAD, Runner

TICK = 0.2  # seconds between looks at pending drops and running jobs
T = TypeVar("T")


class Daemon:
    def __init__(self, opts: WatchOptions, executor: Executor):
        self.opts = opts
        self.folder = DropFolder(opts.drop, opts.out)
        self.stopping, self.kill_now, self.signal_name = False, False, None
        # Entries of the drop folder that are ours, not drops: never reported.
        own = {STATE_DIR, TEMPLATE_NAME}
        for path in (opts.out, opts.template, opts.log_file):
            if path is not None and path.is_relative_to(opts.drop) and path != opts.drop:
                own.add(path.relative_to(opts.drop).parts[0])
        self.intake = Intake(self.folder, opts.template, opts.rerun, lambda: self.stopping)
        self.readiness = Readiness(self.folder, opts.quiet, own, self.intake.guard)
        self.runner = Runner(self.folder, opts, lambda: self.stopping, executor)
        self.space = DiskSpace(self.folder)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            lock = self._until_space(self._lock)  # None: signalled while the disk was full
            try:
                journal = self._until_space(self.folder.open_journal) if lock is not None else None
                if journal is not None:
                    try:
                        self._serve()
                    finally:
                        self.stopping = True
                        self.runner.shutdown(lambda: self.kill_now)
                        self.readiness.stop()
                        journal.close()
            finally:
                if lock is not None:
                    release_lock(lock)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped")
        return 0

    def _lock(self):
        self.folder.jobs_dir.mkdir(parents=True, exist_ok=True)
        return take_lock(
            self.folder.state / "lock",
            lambda pid: (
                f"{shown(self.opts.drop)} is already watched by another dsrpipe watch (pid {pid}); stop it first"
            ),
        )

    def _until_space(self, step: Callable[[], T]) -> T | None:
        """`step()`, tried again while the disk is full (a daemon started on a full disk waits
        too); None if a signal stops the daemon first."""
        while not self.stopping:
            try:
                result = step()
            except Exception as exc:
                if not disk_full(exc):
                    raise
                self.space.full(exc)
                while not self.space.retry() and not self.stopping:
                    time.sleep(TICK)
                continue
            self.space.ok()
            return result
        return None

    def _serve(self) -> None:
        o, limits = self.opts, self.runner.executor.resources
        timeout = f", job timeout {limits.time:g}s" if limits.time else ""
        memory = f", job memory {format_size(limits.memory)}" if limits.memory else ""
        log.info(
            f"watching {shown(o.drop)} -> {shown(o.out)} ({o.workers} worker(s), quiet period {o.quiet:g}s"
            f"{memory}{timeout}{', once' if o.once else ''}"
            f"{', rerun' if o.rerun else ''})"
        )
        self.readiness.start()
        self.readiness.scan()
        recovered = False
        while not self.stopping:
            self.readiness.wait(TICK)
            if not self.space.retry():  # the disk is full: only the jobs' limits are kept meanwhile
                self.runner.enforce_limits()
                continue
            try:
                if not recovered:
                    self.runner.recover()
                    recovered = True
                done = self._tick()
            except Exception as exc:
                if not disk_full(exc):
                    raise
                self.space.full(exc)
                continue
            self.space.ok()
            if done:
                break
        if self.signal_name:
            log.info(f"{self.signal_name}: stopping; no new jobs")

    def _tick(self) -> bool:
        """One look at the ready drops and the jobs; True when --once has nothing left to do. A
        full disk (an exception for which files.disk_full holds) may stop it at any write. Each
        step is safe to run again, and the next tick after the wait retries the one that failed
        first: the drops not yet taken are ready again at once (unless they change meanwhile),
        a job whose end was not recorded is still running, one not started still queued."""
        ready = self.readiness.ready()
        for i, name in enumerate(ready):
            if self.stopping:
                break
            try:
                with self.intake.guard(name):
                    taken = self.intake.take(name)
                    if taken == "again":
                        self.readiness.pend(name)
                    elif taken == "queued":
                        self.runner.warm_up()
            except Exception:
                for later in ready[i:]:
                    self.readiness.pend(later, at_once=True)
                raise
        self.runner.poll()
        self.runner.start_jobs()
        return self.opts.once and not (
            self.readiness.pending or self.runner.running or self.folder.journal.jobs("queued")
        )

    def _on_signal(self, signum, frame) -> None:
        self.kill_now = self.stopping  # a second signal: do not wait for jobs to stop
        self.stopping, self.signal_name = True, signal.Signals(signum).name


class DiskSpace:
    """The drop folder's disk (or the log file's) is full: the daemon waits and tries again,
    never dies of it. One line when it fills up, one when a retry succeeds; the retries back
    off from FIRST_WAIT to LONGEST_WAIT seconds. Meanwhile no drop is taken and no job started
    or recorded, running jobs go on (held to their limits), and a signal stops it as always."""

    FIRST_WAIT, LONGEST_WAIT = 1.0, 30.0
    PROBE_BYTES = 2**16

    def __init__(self, folder: DropFolder):
        self.folder = folder
        self.since: float | None = None  # monotonic, while full
        self.delay, self.retry_at = 0.0, 0.0

    def retry(self) -> bool:
        """Whether to go on now: yes unless the disk was found full, its wait is not over, or
        there is still no room for a PROBE_BYTES file (so that `ok` is not said of a try that
        had nothing to write)."""
        if self.since is None:
            return True
        if time.monotonic() < self.retry_at:
            return False
        if self._room():
            return True
        self._back_off()
        return False

    def _room(self) -> bool:
        probe = self.folder.state / "space-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, bytes(self.PROBE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return not disk_full(exc)  # another error: the real try will say what it is
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
        return True

    def _back_off(self) -> None:
        self.delay = min(2 * self.delay, self.LONGEST_WAIT)
        self.retry_at = time.monotonic() + self.delay

    def full(self, exc: BaseException) -> None:
        try:  # SQLite may leave the failed statement's transaction open
            if self.folder.journal is not None and self.folder.journal.db.in_transaction:
                self.folder.journal.db.rollback()
        except sqlite3.Error:
            pass
        if self.since is None:
            self.since, self.delay = time.monotonic(), self.FIRST_WAIT
            log.warning(
                f"the disk is full{self._writing(exc)}: waiting for space, trying again every "
                f"{self.FIRST_WAIT:g} to {self.LONGEST_WAIT:g}s (no drop is taken and no job started "
                "meanwhile; running jobs go on)"
            )
            self.retry_at = time.monotonic() + self.delay
        else:
            self._back_off()

    def ok(self) -> None:
        if self.since is not None:
            log.info(f"there is space again (after {time.monotonic() - self.since:.0f}s): serving")
            self.since = None

    def _writing(self, exc: BaseException) -> str:
        if isinstance(exc, DiskFull):
            path = exc.path
        elif isinstance(exc, sqlite3.Error):
            path = self.folder.state / JOURNAL_NAME
        else:
            path = getattr(exc, "filename", None)
        return f" writing {shown(path)}" if path else ""


def watch(opts: WatchOptions) -> int:
    """`dsrpipe watch`: check the options, then serve the drop folder until signalled."""
    if opts.workers < 1 or opts.quiet < 0:
        raise UserError("--workers must be at least 1 and --quiet-period at least 0")
    resources = opts.executor.resources(opts.nproc_per_job)  # bad values: one line, before any file
    drop, out = _folders(opts)
    template = Path(opts.template).expanduser().resolve() if opts.template else None
    if template is not None and not template.is_file():
        raise UserError(f"template {shown(template)} does not exist")
    state = _state_folder(drop)
    log_file = Path(opts.log_file).expanduser().resolve() if opts.log_file else None
    _setup_logging(log_file)
    executor = _executor(opts, resources, drop, out, state)
    paths = {"drop": drop, "out": out, "template": template, "log_file": log_file}
    return Daemon(dataclasses.replace(opts, **paths), executor).run()


def _folders(opts: WatchOptions) -> tuple[Path, Path]:
    """The drop folder and --out, resolved and checked."""
    drop = Path(opts.drop).expanduser()
    if not drop.is_dir():
        raise UserError(
            f"drop folder {shown(drop)} {'is not a folder' if drop.exists() else 'does not exist'}"
        )
    drop = drop.resolve()
    out = Path(opts.out).expanduser().resolve()
    if out == drop:
        raise UserError("--out must not be the drop folder itself")
    if opts.executor.executor == "slurm" and out.is_relative_to(drop):
        # submitit's job files are pickles that the daemon loads: never where drops are written
        raise UserError(
            "--executor slurm: --out must be outside the drop folder (the Slurm jobs' files, which "
            "the daemon loads, are kept there)"
        )
    return drop, out


def _state_folder(drop: Path) -> Path:
    """<drop>/.dsrpipe, made if new; one line if it cannot be used."""
    state = drop / STATE_DIR
    if state.is_symlink():  # whoever writes drops could point it at any folder the daemon may write
        raise UserError(
            f"the state folder {shown(state)} is a symbolic link, which is not followed; remove it"
        )
    try:
        state.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the state folder {shown(state)}: {exc.strerror}") from None
    if not os.access(state, os.R_OK | os.W_OK | os.X_OK):
        raise UserError(f"cannot use the state folder {shown(state)}: permission denied")
    return state


def _executor(opts: WatchOptions, resources: Resources, drop: Path, out: Path, state: Path) -> Executor:
    """Where the jobs run: forked here, held to their limits by the local executor; or sent to an
    engine, which holds them to what they ask for."""
    chosen = opts.executor
    # the same after a restart: the daemon re-attaches to its jobs through it
    owner = f"dsrpipe-watch-{hashlib.sha256(str(drop).encode()).hexdigest()[:12]}"
    address = chosen.address
    if chosen.executor == "ray" and address is None:
        address = _recorded_address(state / JOURNAL_NAME)
    executor = make_executor(
        chosen.executor,
        resources,
        owner=owner,
        folder=out / SLURM_DIR / owner,
        jobs=opts.workers,
        address=address,
        preload=PRELOAD,
    )
    if executor.remote:
        out.mkdir(parents=True, exist_ok=True)
        executor.check_storage(out)
        log.info(f"jobs run on {executor.describe()}")
    elif not local_limits.AVAILABLE:
        log.warning("no /proc here: --job-memory is not enforced")
    return executor


def _recorded_address(journal_path: Path) -> str | None:
    """The Ray cluster that this folder's running jobs were submitted to, from the journal: a
    daemon started without --address joins it again, to re-attach them (a daemon's own local Ray
    is none: it stopped with its daemon). One line if they run on several."""
    try:
        journal = Journal(journal_path, readonly=True)
    except FileNotFoundError:
        return None
    try:
        addresses = journal.addresses("ray")
    finally:
        journal.close()
    if len(addresses) > 1:
        raise UserError(
            f"jobs of this folder run on several Ray clusters ({', '.join(sorted(addresses))}), and a daemon "
            "joins one: stop those of all but one, then start the daemon again"
        )
    if not addresses:
        return None
    [address] = addresses
    refused = connection_refused(address)
    if refused is not None:  # the jobs went with it: the runner queues them again
        log.warning(f"the Ray cluster at {address}, which ran jobs of this folder, is gone ({refused})")
        return None
    log.info(f"joining the Ray cluster at {address}, which runs jobs of this folder (see the journal)")
    return address


def _setup_logging(log_file: Path | None) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    stderr = logging.StreamHandler(sys.stderr)
    handlers: list[logging.Handler] = [stderr]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            # Names are escaped in log lines already; this is the second guard.
            handlers.append(_LogFile(log_file, stderr))
        except OSError as exc:
            raise UserError(f"cannot write the log file {shown(log_file)}: {exc.strerror}") from None
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)


class _LogFile(logging.FileHandler):
    """--log-file. While the disk is full its lines may be missing there: that is said once on
    stderr, which has every line, instead of logging's traceback on stderr for each line."""

    def __init__(self, path: Path, stderr: logging.Handler):
        super().__init__(path, errors="backslashreplace")
        self.stderr, self.losing, self.failed = stderr, False, False

    def emit(self, record: logging.LogRecord) -> None:
        self.failed = False
        super().emit(record)  # calls handleError on a failure
        if not self.failed:
            self.losing = False

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        exc = sys.exc_info()[1]
        if exc is None or not disk_full(exc):
            return super().handleError(record)
        if not self.losing:
            self.losing = True
            message = (
                f"the disk is full writing the log file {shown(self.baseFilename)}: lines may be "
                "missing there until there is space (stderr has them all)"
            )
            self.stderr.handle(logging.makeLogRecord({"msg": message}))
