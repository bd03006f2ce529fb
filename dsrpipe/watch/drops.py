"""What a drop is: its kind, its job name, its stamp (cheap) and its content hash (exact).

Names are bytes: an entry's name is whatever the filesystem allows, held by Python as a str with
surrogate escapes where it is not UTF-8. Hashing works on the bytes; messages, the journal and
the log get `files.shown(name)`; a dataset holding a name that is not UTF-8 is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from ..catalog import ARCHIVE_SUFFIXES, archive_suffix, find_splits
from ..files import is_text, shown

STATE_DIR = ".dsrpipe"
JOURNAL_NAME = "journal.sqlite"  # in STATE_DIR
SLURM_DIR = ".dsrpipe-slurm"  # in --out: submitit's files of a daemon's Slurm jobs
TEMPLATE_NAME = "template.yaml"
READY_MARKER = ".ready"
ERROR_SUFFIX = ".error.txt"
PIPELINE_SUFFIXES = (".yaml", ".yml")
MAX_PIPELINE_BYTES = 2**20

DEFAULT_TEMPLATE = """\
# dsrpipe watch: the built-in template for dataset drops (data.dataset and data.root are set
# per drop). A small CNN trained with DSR at 90% sparsity, on images fitted to the median side of
# the training images (no data.image_size).
model:
  name: small-cnn
sparsity:
  method: dsr
  sparsity: 0.9
  prune_target: 600
  rewire_periods: {0: 50}
train:
  epochs: 30
  batch_size: 64
  lr: 0.05
  milestones: [20, 26]
  gamma: 0.2
finetune:
  epochs: 3
  batch_size: 64
  lr: 0.002
"""


class IntakeError(Exception):
    """A drop that cannot be taken as it is; the message is the one-line cause."""


class Stopped(Exception):
    """Hashing was cut short because the daemon is stopping."""


def slug(text: str) -> str:
    """A safe job (folder) name from any text: [A-Za-z0-9._-], starting with a letter or digit."""
    text = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", text)).strip("-._")
    return text[:80].rstrip("-._") or "job"


def drop_stem(name: str) -> str:
    lower = name.lower()
    suffix = archive_suffix(name) or next((s for s in PIPELINE_SUFFIXES if lower.endswith(s)), "")
    return name[: len(name) - len(suffix)]


def job_kind(name: str) -> str:
    """What the journal calls a drop: 'pipeline' or 'dataset' (a folder or an archive)."""
    return "pipeline" if name.lower().endswith(PIPELINE_SUFFIXES) else "dataset"


def entry_kind(path: Path, st: os.stat_result) -> tuple[str | None, str]:
    """'pipeline', 'archive' or 'folder' (a dataset or not: decided once it is ready); else None, why."""
    name = path.name.lower()
    if stat.S_ISLNK(st.st_mode):
        return None, "a symbolic link (links are not followed: copy the files in)"
    if stat.S_ISDIR(st.st_mode):
        return "folder", ""
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file or folder"
    if name.endswith(PIPELINE_SUFFIXES):
        return "pipeline", ""
    if archive_suffix(name):
        return "archive", ""
    return None, (
        f"not a pipeline (.yaml/.yml), a dataset folder or a dataset archive ({'/'.join(ARCHIVE_SUFFIXES)})"
    )


def is_dataset_folder(path: Path) -> bool:
    return find_splits(path) is not None


def _tree(root: Path, *, strict: bool) -> list[tuple[str, os.stat_result, Path]]:
    """Everything under root (links not followed) as (relative path, lstat, path), sorted."""

    def fail(error: OSError):
        raise IntakeError(f"cannot read {shown(error.filename)}: {error.strerror}")

    entries = []
    for folder, dirnames, filenames in os.walk(root, onerror=fail if strict else None):
        for name in dirnames + filenames:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel != READY_MARKER:
                entries.append((rel, path.lstat(), path))
    return sorted(entries, key=lambda entry: entry[0])


def stamp(path: Path) -> str:
    """Cheap identity of a drop's current bytes (sizes + mtimes), to skip re-hashing unchanged drops."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        return f"{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256()
    for rel, st, _ in _tree(path, strict=False):
        digest.update(os.fsencode(rel) + f"\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "tree:" + digest.hexdigest()[:32]


def _file_hash(path: Path, should_stop: Callable[[], bool]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            if should_stop():
                raise Stopped
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: Path, should_stop: Callable[[], bool] = lambda: False) -> str:
    """sha256 of a file's bytes; of a folder, of its sorted relative paths, sizes and file hashes.
    A folder holding a name that is not UTF-8, a link that leaves it, or a device, socket or pipe
    is refused, before any file is read."""
    if not stat.S_ISDIR(path.lstat().st_mode):
        return _file_hash(path, should_stop)
    entries = _tree(path, strict=True)
    for rel, st, entry in entries:
        _check_entry(path, rel, st, entry)
    digest = hashlib.sha256()
    for rel, st, entry in entries:
        if stat.S_ISLNK(st.st_mode):
            content = f"link:{os.readlink(entry)}"
        elif stat.S_ISDIR(st.st_mode):
            content = "folder"
        else:
            content = _file_hash(entry, should_stop)
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        digest.update(os.fsencode(rel) + f"\0{size}\0".encode() + os.fsencode(content) + b"\n")
    return digest.hexdigest()


def _check_entry(folder: Path, rel: str, st: os.stat_result, entry: Path) -> None:
    where = f"unsafe dataset folder {shown(folder.name)}: '{shown(rel)}'"
    if not is_text(rel):
        raise IntakeError(
            f"dataset folder {shown(folder.name)}: '{shown(rel)}' is not a UTF-8 name; rename it"
        )
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(entry)
        try:
            inside = (entry.parent / target).resolve().is_relative_to(folder.resolve())
        except (OSError, RuntimeError):  # a link loop
            inside = False
        if not inside:
            raise IntakeError(f"{where} is a link to {shown(target)}, outside the folder")
    elif not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise IntakeError(f"{where} is a device, socket or pipe, not a file or folder")
