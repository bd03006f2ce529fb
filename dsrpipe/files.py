"""Atomic writes (a reader sees the old file or the complete new one, never half of either),
the exclusive lock that makes one process the owner of a run or a folder, file names as text (a name is whatever bytes
the filesystem allows, not always UTF-8), and the opening of files someone else may have put in
place (`open_regular`: no final symbolic link followed, no FIFO or device waited on). Torch-free:
torch files are written and read by dsrpipe.checkpoint."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import re
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import DiskFull, UserError
from .names import file_kind, shown

_UMASK = os.umask(0)
os.umask(_UMASK)


def is_text(name: str | os.PathLike) -> bool:
    """Whether a file name or path is valid UTF-8 (so it can be written anywhere as it is)."""
    try:
        os.fsencode(name).decode("utf-8")
    except UnicodeError:
        return False
    return True


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if disk_full(exc):  # no room even for a folder entry or an inode
            raise DiskFull(path) from None
        raise
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; a deployed model must be readable by others
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if disk_full(exc):  # the old file, if any, is still whole: a rerun once there is space picks up
            raise DiskFull(path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(exc: BaseException) -> bool:
    """Whether an error says the disk (or the quota) is full: DiskFull, ENOSPC/EDQUOT, SQLite's
    SQLITE_FULL ("database or disk is full"), or torch.save's RuntimeError for the same
    ("unexpected pos", its zip writer's short write)."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)  # the extended code: its low byte is the primary one
        return (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "disk is full" in str(exc)
    return isinstance(exc, RuntimeError) and "unexpected pos" in str(exc)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to a log file; DiskFull naming it if the disk is full."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as exc:
        if disk_full(exc):
            raise DiskFull(path) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def open_regular(
    path: str | os.PathLike, what: str, *, follow: bool = False, write: bool = False, limit: int | None = None
) -> int:
    """A descriptor of `path`, which must be a regular file, else a one-line UserError naming the
    path and what it is (never anything it holds). A final symbolic link is not followed unless
    `follow` (a file the user named may be a link; one that others can put in place may not: it
    could lead to any file this process can read). O_NONBLOCK: a FIFO or a device fails here
    instead of blocking the process in open() or read() for good. `write` opens it read-write,
    created if missing; `limit` bounds its size in bytes. FileNotFoundError passes through."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    flags |= (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise UserError(f"{what} {shown(path)} is a symbolic link, which is not followed here") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"cannot open {what} {shown(path)}: permission denied") from None
        raise UserError(f"cannot open {what} {shown(path)}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} {shown(path)} is {file_kind(st.st_mode)}, not a regular file")
        if limit is not None and st.st_size > limit:
            raise UserError(f"{what} {shown(path)} is {st.st_size:,} bytes, more than the {limit:,} allowed")
        os.set_blocking(fd, True)  # a regular file never blocks; reads must not stop short
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, what: str, limit: int, *, follow: bool = False) -> bytes:
    """The bytes of a regular file (see `open_regular`), at most `limit` of them (one that grew
    past it since its size was checked is refused too)."""
    with os.fdopen(open_regular(path, what, follow=follow, limit=limit), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{what} {shown(path)} is more than the {limit:,} bytes allowed")
    return data


def exclusive_lock(path: str | os.PathLike) -> IO | None:
    """Open `path` and take its exclusive lock for as long as the file stays open, with our pid
    written in it (to say who holds it, and to stop an orphan); None if another process holds it.
    The kernel drops the lock when the holder exits, however it exits: no stale locks. The file
    must be a regular file, not a link (see `open_regular`): it is truncated and written."""
    f = os.fdopen(open_regular(path, "the lock file", write=True), "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
    except BaseException as exc:
        try:
            f.close()  # flushes what did not fit again, which fails again; the descriptor is closed
        except OSError:
            pass
        if isinstance(exc, OSError) and disk_full(exc):  # no room for the pid
            raise DiskFull(path) from None
        raise
    return f


def lock_holder(path: str | os.PathLike) -> int | None:
    """The pid written in a lock file by its holder, if any."""
    try:
        text = read_regular(path, "the lock file", 64).decode(errors="replace").strip()
    except (OSError, UserError):
        return None
    return int(text) if text.isdigit() else None


def take_lock(path: str | os.PathLike, busy: Callable[[str], str]) -> IO:
    """`path`'s exclusive lock (see `exclusive_lock`), or a one-line UserError `busy(pid)` naming
    the process that holds it."""
    try:
        lock = exclusive_lock(path)
    except DiskFull:
        raise
    except OSError as exc:
        raise UserError(f"cannot lock {shown(path)}: {exc.strerror or exc}") from None
    if lock is None:
        raise UserError(busy(str(lock_holder(path) or "?")))
    return lock


def release_lock(lock: IO) -> None:
    """Let go of a lock taken by `take_lock` or `exclusive_lock`, its pid cleared first: no stale
    pid for anyone. Unlocked before it is closed: a process forked while it was held shares the
    lock, and closing our copy alone would leave it held."""
    try:
        lock.truncate(0)
        fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        lock.close()


@contextmanager
def holding_lock(path: str | os.PathLike, busy: Callable[[str], str]) -> Iterator[IO]:
    """`take_lock` for the block, released however the block ends."""
    lock = take_lock(path, busy)
    try:
        yield lock
    finally:
        release_lock(lock)


def unreadable_because(why: str | BaseException) -> str:
    """Why a loader refused a file, in a few words: a pickle's forbidden global, or the loader's
    first line."""
    if isinstance(why, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(why))
        return "it holds Python objects, not only tensors and plain data" + (f": {found[1]}" if found else "")
    if isinstance(why, BaseException):
        first = str(why).strip().split("\n")[0].split(". ")[0]
        return f"{type(why).__name__}: {first}" if first else type(why).__name__
    return why


def not_a_checkpoint(path: Path, why: str | BaseException) -> UserError:
    """The one-line error for a file that is not a checkpoint dsrpipe wrote, saying why."""
    return UserError(f"{path} is not a dsrpipe checkpoint ({unreadable_because(why)})")
