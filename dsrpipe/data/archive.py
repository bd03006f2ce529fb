"""Safe archive extraction: what a dataset archive may unpack to is checked member by member,
on the sizes it declares, before a byte is written; anything beyond the caps is refused as a
likely archive bomb."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..catalog import ARCHIVE_SUFFIXES, archive_suffix
from ..errors import UserError
from ..files import is_text, shown


@dataclass(frozen=True)
class ArchiveCaps:
    """What one archive may unpack to (the watch daemon passes its own, --max-unpacked and
    --max-files)."""

    max_bytes: int = 20 * 2**30
    max_files: int = 2_000_000


def cache_key(*parts) -> str:
    """A short hash naming a cached unpacking or decoding by what it was made from."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def extract_archive(
    archive: str | os.PathLike,
    dest_root: str | os.PathLike,
    caps: ArchiveCaps = ArchiveCaps(),
) -> Path:
    """Unpack `archive` once into dest_root/<name>-<key> (key: path, size, mtime) and return it.

    Members must be plain files or folders with UTF-8 relative paths inside the archive; their
    total size and count are capped (`caps`), checked on the sizes
    the archive declares (zip: its central directory; tar: its headers) before anything is
    unpacked. It unpacks into a temporary folder renamed into place at the end, so an
    interrupted extraction never looks complete.
    """
    archive = Path(archive)
    suffix = archive_suffix(archive.name)
    if not suffix:
        raise UserError(f"{archive} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    st = archive.stat()
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{archive} is not a regular file")
    stem = archive.name[: -len(suffix)]
    target = Path(dest_root) / f"{stem}-{cache_key(str(archive.resolve()), st.st_size, st.st_mtime_ns)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    limits = _Limits(archive, caps.max_bytes, caps.max_files)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=target.parent))
    try:
        if suffix == ".zip":
            _extract_zip(archive, tmp, limits)
        else:
            _extract_tar(archive, tmp, limits)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished the same extraction first
                raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise UserError(f"cannot unpack archive {archive}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class _Limits:
    """Checks members one by one: a safe relative path, and running totals under the caps."""

    def __init__(self, archive: Path, max_bytes: int, max_files: int):
        self.archive, self.max_bytes, self.max_files = archive, max_bytes, max_files
        self.bytes = self.files = 0

    def check(self, name: str, size: int, safe_type: bool) -> None:
        path = PurePosixPath(name)
        if not is_text(name):
            self.reject(name, "a name that is not valid UTF-8")
        if path.is_absolute() or name.startswith("\\") or ".." in path.parts:
            self.reject(name, "a path outside the archive")
        if not safe_type:
            self.reject(name, "a link or special file, not a plain file or folder")
        self.files += 1
        self.bytes += size
        if self.files > self.max_files:
            self.reject(name, f"more than {self.max_files} members")
        if self.bytes > self.max_bytes:
            self.reject(name, f"more than {self.max_bytes} bytes unpacked")

    def reject(self, name: str, why: str):
        raise UserError(f"unsafe archive {shown(self.archive)}: member '{shown(name)}': {why}")


def _extract_tar(archive: Path, dest: Path, limits: _Limits) -> None:
    # First every header (tarfile skips over the data; a compressed archive is decompressed, not
    # written), so a bomb is refused before a byte is unpacked. A header's size is exact: the
    # data that follows is that long. The 'data' filter is a second guard.
    with tarfile.open(archive) as tar:
        members = []
        for member in tar:
            limits.check(member.name, member.size, member.isfile() or member.isdir())
            members.append(member)
        for member in members:
            tar.extract(member, dest, filter="data")


def _extract_zip(archive: Path, dest: Path, limits: _Limits) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()  # the central directory: every member's declared size
        for info in members:
            # Unix file type from the mode bits; 0 when the zip was written without one.
            kind = stat.S_IFMT(info.external_attr >> 16)
            plain = kind in (0, stat.S_IFREG, stat.S_IFDIR)
            # file_size bounds what is written: zipfile stops there and checks the CRC.
            limits.check(info.filename, info.file_size, plain)
        for info in members:
            zf.extract(info, dest)
