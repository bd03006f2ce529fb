"""The machine this process runs on, as its limits say: the cores it may use (its CPU affinity:
a container's, a Slurm job's or taskset's share, not every core of the host) and its memory (the
cgroup limit it runs under, if lower than the host's). One home for both: thread counts, loader
workers and a watch job's default memory all start here."""

from __future__ import annotations

import os
from pathlib import Path


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def memory() -> int:
    """Bytes of memory: the host's, or the cgroup limit (a container's, a systemd unit's) if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2, or "max"
        pass
    return total
