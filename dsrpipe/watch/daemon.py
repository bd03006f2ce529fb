"""The daemon: holds the drop folder's lock, and runs the loop that serves it (readiness →
intake → runner) until it is signalled (or, with --once, until nothing is left to do)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from ..errors import UserError
from ..files import exclusive_lock, lock_holder, shown
from . import limits
from .drops import STATE_DIR, TEMPLATE_NAME
from .folder import DropFolder, log
from .intake import Intake
from .options import WatchOptions, default_job_memory, format_size
from .readiness import Readiness
from .runner import Runner

TICK = 0.2  # seconds between looks at pending drops and running jobs


class Daemon:
    def __init__(self, opts: WatchOptions):
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
        self.runner = Runner(self.folder, opts, lambda: self.stopping)

    def run(self) -> int:
        self.folder.jobs_dir.mkdir(parents=True, exist_ok=True)
        lock = exclusive_lock(self.folder.state / "lock")
        if lock is None:
            pid = lock_holder(self.folder.state / "lock") or "?"
            raise UserError(
                f"{shown(self.opts.drop)} is already watched by another dsrpipe watch (pid {pid}); "
                "stop it first"
            )
        try:
            journal = self.folder.open_journal()
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                self._serve()
            finally:
                self.stopping = True
                self.runner.shutdown(lambda: self.kill_now)
                self.readiness.stop()
                journal.close()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            lock.truncate(0)  # no stale pid for `dsrpipe status`
            lock.close()
        log.info("stopped")
        return 0

    def _serve(self) -> None:
        o = self.opts
        timeout = f", job timeout {o.job_timeout:g}s" if o.job_timeout else ""
        log.info(
            f"watching {shown(o.drop)} -> {shown(o.out)} ({o.workers} worker(s), quiet period {o.quiet:g}s, "
            f"job memory {format_size(o.job_memory)}{timeout}{', once' if o.once else ''}"
            f"{', rerun' if o.rerun else ''})"
        )
        self.runner.recover()
        self.readiness.start()
        self.readiness.scan()
        while not self.stopping:
            self.readiness.wait(TICK)
            for name in self.readiness.ready():
                if self.stopping:
                    break
                with self.intake.guard(name):
                    taken = self.intake.take(name)
                    if taken == "again":
                        self.readiness.pend(name)
                    elif taken == "queued":
                        self.runner.warm_up()
            self.runner.poll()
            self.runner.start_jobs()
            if o.once and not (
                self.readiness.pending or self.runner.running or self.folder.journal.jobs("queued")
            ):
                break
        if self.signal_name:
            log.info(f"{self.signal_name}: stopping; no new jobs")

    def _on_signal(self, signum, frame) -> None:
        self.kill_now = self.stopping  # a second signal: do not wait for jobs to stop
        self.stopping, self.signal_name = True, signal.Signals(signum).name


def watch(opts: WatchOptions) -> int:
    """`dsrpipe watch`: check the options, then serve the drop folder until signalled."""
    drop = Path(opts.drop).expanduser()
    if not drop.is_dir():
        raise UserError(
            f"drop folder {shown(drop)} {'is not a folder' if drop.exists() else 'does not exist'}"
        )
    drop = drop.resolve()
    out = Path(opts.out).expanduser().resolve()
    if out == drop:
        raise UserError("--out must not be the drop folder itself")
    template = Path(opts.template).expanduser().resolve() if opts.template else None
    if template is not None and not template.is_file():
        raise UserError(f"template {shown(template)} does not exist")
    if opts.workers < 1 or opts.quiet < 0:
        raise UserError("--workers must be at least 1 and --quiet-period at least 0")
    if (opts.job_memory is not None and opts.job_memory <= 0) or (
        opts.job_timeout is not None and opts.job_timeout <= 0
    ):
        raise UserError("--job-memory and --job-timeout must be more than 0")
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
    log_file = Path(opts.log_file).expanduser().resolve() if opts.log_file else None
    _setup_logging(log_file)
    job_memory = opts.job_memory or default_job_memory(opts.workers)
    if not limits.AVAILABLE:
        log.warning("no /proc here: --job-memory is not enforced")
    return Daemon(
        WatchOptions(
            **{
                **opts.__dict__,
                "drop": drop,
                "out": out,
                "template": template,
                "log_file": log_file,
                "job_memory": job_memory,
            }
        )
    ).run()


def _setup_logging(log_file: Path | None) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            # Names are escaped in log lines already; this is the second guard.
            handlers.append(logging.FileHandler(log_file, errors="backslashreplace"))
        except OSError as exc:
            raise UserError(f"cannot write the log file {shown(log_file)}: {exc.strerror}") from None
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
