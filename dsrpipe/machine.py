"""The machine this process runs on, as its limits say: the cores it may use (its CPU affinity:
a container's, a Slurm job's or taskset's share, not every core of the host) and its memory (the
cgroup limit it runs under, if lower than the host's). One home for both: thread counts, loader
workers and a watch job's default memory all start here. And the CPU itself (`cpu_features`),
which validate's reports and the cached layer times name."""

from __future__ import annotations

import os
import platform
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


# The /proc/cpuinfo flags that decide how onnxruntime's int8 kernels add (docs/int8.md): without
# avx512_vnni, avx_vnni or amx_int8, pairs of u8*s8 products add in saturating int16.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
INT32_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """The CPU this process runs on: model name and the CPU_FLAGS present (True/False), read
    from /proc/cpuinfo. Where that file is missing (not Linux) or has no flags line, the flags are
    None (unknown) and the model name comes from `platform`. `int32_dot` says whether int8 dot
    products add in int32 (VNNI or AMX): False means full-range int8 weights may saturate."""
    model, flags = None, None
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    present = None if flags is None else {flag: flag in flags for flag in CPU_FLAGS}
    return {
        "model_name": model or platform.processor() or None,
        "machine": platform.machine(),
        "flags": present,
        "int32_dot": None if present is None else any(present[f] for f in INT32_DOT_FLAGS),
    }
