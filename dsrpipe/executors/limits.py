"""The limits of a job forked here (forkserver.py): how much memory it uses, the sum over its
process group (the job process and the workers it forks) read from /proc, and its default.

Why the executor watches and kills rather than the kernel enforcing: RLIMIT_AS caps virtual
address space, which CUDA and PyTorch's allocators reserve far beyond what they use, so it fails
healthy jobs; Linux ignores RLIMIT_RSS; a cgroup's memory.max would be exact, but making one needs
a delegated cgroup subtree (root, or systemd's Delegate=yes), which a plain `dsrpipe watch` does
not have. So the executor samples each job a few times a second and kills its group once it is
over the limit: a job can overshoot by what it allocates between two samples, and beyond that
the kernel's OOM killer stays the backstop. GPU memory is not counted.

Each process counts its proportional set size (PSS: a page shared with the fork server or
between workers is split among its sharers, not counted in full for each), or its resident size
on kernels without smaps_rollup (before 4.14).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .. import machine

AVAILABLE = os.path.exists("/proc/self/stat")
_PAGE = os.sysconf("SC_PAGE_SIZE")
JOB_MEMORY_SHARE = 0.8  # a job's default memory: this share of the machine's, split between the jobs


def default_job_memory(jobs: int) -> int:
    """The machine's memory (machine.memory: its cgroup's, if lower) × JOB_MEMORY_SHARE / jobs."""
    return int(machine.memory() * JOB_MEMORY_SHARE / jobs)


def group_memory(groups: Iterable[int]) -> dict[int, int]:
    """Bytes used by each of these process groups."""
    usage = dict.fromkeys(groups, 0)
    if not usage or not AVAILABLE:  # no /proc (not Linux): nothing is measured; the daemon says so
        return usage
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                group = int(f.read().rsplit(b")", 1)[1].split()[2])  # after "pid (comm)": state ppid pgrp
            if group in usage:
                usage[group] += _process_memory(entry.name)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            pass
    return usage


def _process_memory(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE
