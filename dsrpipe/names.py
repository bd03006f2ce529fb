"""Names: file names as text (one home below the errors that quote them and the file helpers that
log them), what kind of file a name is, and what a run name and a Slurm partition may be."""

from __future__ import annotations

import os
import re
import stat

# A run name (and a grid's, a watch job's) is a folder name: no paths, no surprises.
SAFE_NAME_LENGTH = 100
SAFE_NAME = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{SAFE_NAME_LENGTH - 1}}}"
# A Slurm partition (or a comma-separated list of them), as the pipeline's `cluster.partition` and
# `--partition` take it. It is written into the sbatch script: nothing else gets through.
SLURM_PARTITION = r"[A-Za-z0-9_.,-]{1,64}"
SLURM_PARTITION_RULE = "1 to 64 letters, digits and _.,-"


def is_slurm_partition(name: str) -> bool:
    # fullmatch: with match or search, `$` also matches before a final line break, which would
    # then end the #SBATCH line and start a command of its own.
    return isinstance(name, str) and re.fullmatch(SLURM_PARTITION, name) is not None


def shown(name: str | os.PathLike) -> str:
    """A file name or path as text fit for a message, a log line or a database: bytes that are not
    UTF-8 (which Python holds as surrogate escapes) become \\xNN, control characters \\n, \\t, ..."""
    try:
        text = os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        text = os.fspath(name).encode("utf-8", "backslashreplace").decode()
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, for a message: "a FIFO", "a folder", ..."""
    return _KINDS.get(stat.S_IFMT(mode), "a device")
