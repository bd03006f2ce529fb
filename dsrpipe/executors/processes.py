"""Processes on this machine, without torch: the fork server that watch's local jobs start from,
and signalling a job's process group. (The daemon imports this module; it never imports torch.)"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing import forkserver
from typing import Any

PR_SET_PDEATHSIG = 1


class ForkServer:
    """Job processes forked from a server that has `preload` imported, so that a job starts in
    milliseconds, not seconds (the server skips modules that fail to import)."""

    def __init__(self, preload: list[str]):
        self.preload, self._context = preload, None

    def context(self):
        if self._context is None:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(self.preload)
        return self._context

    def warm_up(self) -> None:
        self.context()
        forkserver.ensure_running()

    def start(self, target: Callable[..., Any], args: tuple, name: str):
        proc = self.context().Process(target=target, args=args, name=name)
        proc.start()
        return proc


def signal_group(pid: int, sig: int) -> None:
    """Signal a job's process group (the job and the workers it forked), else the process."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    except PermissionError:
        pass


def die_with_parent() -> None:
    """In a child, before exec: SIGKILL when the process that started it dies (Linux; elsewhere
    the caller's own cleanup has to do)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def as_worker_child() -> None:
    """In a job started by an engine's worker, before exec:
    - SIGKILL when the worker dies, so that a job never outlives it (a killed worker's retry
      would find it still holding the run);
    - Slurm's preemption signal ignored: Slurm sends it to every process of the step, and the
      worker (submitit) answers it by stopping the job gently (SIGTERM: it checkpoints) and
      requeueing; by default it would kill the job before its checkpoint."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    die_with_parent()


def children(pid: int) -> list[int]:
    """The processes that `pid` started and that still run (from /proc; empty where it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid`, zombies left out (from /proc; empty where
    there is none)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":  # after the name: state, ppid, pgrp
            members.append(int(entry))
    return members
