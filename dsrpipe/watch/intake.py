"""Intake: a ready drop becomes a queued job, a skipped repeat, or a drop failed at once.

The journal records each drop by path and content hash (a dataset's with the template it runs
with): the same content is not run twice (unless --rerun and dropped anew), changed content, or a
dataset dropped again after the template changed, is a new job. Job names: the pipeline's
`name:` (or the drop's file name, made a safe slug); if another content already owns that name,
`<name>-<first 8 hex of the content hash>`. A job runs from a copy of what was hashed (or of the
template as it was then), so a later edit is a new drop and a resumed job keeps its settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import files
from ..errors import UserError
from ..files import is_text, shown
from ..names import SAFE_NAME
from ..safeyaml import parse_yaml
from .drops import (
    DEFAULT_TEMPLATE,
    MAX_PIPELINE_BYTES,
    TEMPLATE_NAME,
    IntakeError,
    Stopped,
    content_hash,
    drop_stem,
    entry_kind,
    is_dataset_folder,
    job_kind,
    slug,
    stamp,
)
from .folder import DropFolder, log
from .journal import ACTIVE

NAME_RE = re.compile(SAFE_NAME)
# For the tests: the intake of the drop of this name raises, as a bug in it would.
FAULT_ENV = "DSRPIPE_WATCH_FAULT"


class Intake:
    def __init__(self, folder: DropFolder, template: Path | None, rerun: bool, stopping: Callable[[], bool]):
        self.folder, self.template, self.rerun, self.stopping = folder, template, rerun, stopping

    @contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """Any unexpected error while looking at one drop fails that drop, never the daemon. A full
        disk is not the drop's fault: it passes through, for the daemon to wait and take the drop
        again (see daemon.DiskSpace)."""
        try:
            yield
        except Exception as exc:
            if files.disk_full(exc):
                raise
            cause = f"internal error while taking this drop: {type(exc).__name__}: {exc}"
            try:
                try:
                    before = stamp(self.folder.drop / name)
                except OSError:
                    before = ""
                self._reject(name, job_kind(name), before, cause, traceback.format_exc())
            except Exception:
                log.exception(f"drop {shown(name)}: {shown(cause)}; could not record it as failed")

    def take(self, name: str) -> str | None:
        """Hash a ready entry and decide: 'queued', 'again' (it changed while it was being read:
        wait until it is quiet again), or None (skipped, failed, ignored, unchanged or gone)."""
        if name == os.environ.get(FAULT_ENV):
            raise RuntimeError(f"{FAULT_ENV} names this drop")
        path = self.folder.drop / name
        try:
            kind, why = entry_kind(path, path.lstat())
            if kind is None:
                return self.folder.ignore(name, why)
            if kind == "folder" and not is_dataset_folder(path):
                return self.folder.ignore(name, "a folder without train/ and test/ (or val/) class folders")
            kind = "pipeline" if kind == "pipeline" else "dataset"
            before = stamp(path)
            latest = self.folder.journal.latest_for_path(name)
            if latest is not None and latest["stamp"] == before:
                return None  # seen exactly like this already
            if not is_text(name):
                return self._reject(
                    name, kind, before, f"the drop's name '{shown(name)}' is not UTF-8; rename it"
                )
            content = None
            try:
                if kind == "pipeline":
                    size = path.stat().st_size
                    if size > MAX_PIPELINE_BYTES:
                        raise IntakeError(
                            f"{name}: {size:,} bytes is too big for a pipeline file "
                            f"(at most {MAX_PIPELINE_BYTES:,})"
                        )
                    # Not path.read_bytes(): the entry may have become a link or a FIFO since lstat().
                    content = files.read_regular(path, "the pipeline", MAX_PIPELINE_BYTES)
                    sha = hashlib.sha256(content).hexdigest()
                else:
                    sha = content_hash(path, self.stopping)
            except (IntakeError, UserError, PermissionError) as exc:
                if stamp(path) != before:
                    return "again"
                cause = (
                    f"cannot read {exc.filename}: {exc.strerror}"
                    if isinstance(exc, PermissionError)
                    else str(exc)
                )
                return self._reject(name, kind, before, cause)
            if stamp(path) != before:  # changed while being read
                return "again"
        except Stopped:
            return None
        except FileNotFoundError:
            return None  # removed meanwhile
        return self._decide(name, kind, sha, before, content)

    def _decide(self, name: str, kind: str, sha: str, before: str, content: bytes | None) -> str | None:
        try:
            template = None if kind == "pipeline" else self._read_template()
        except IntakeError as exc:
            return self._reject(name, kind, before, str(exc))
        if template is not None:  # a dataset runs as the template says: a fixed template is a new job
            sha = hashlib.sha256(f"{sha}\0template\0".encode() + template[0]).hexdigest()
        journal = self.folder.journal
        same = journal.job_for_content(sha)
        if same is not None and (same["state"] in ACTIVE or not self.rerun):
            why = f"same content as job {same['name']} (#{same['id']}, {same['state']})"
            if same["state"] not in ACTIVE:
                why += "; drop it again under --rerun to run it again"
            latest = journal.latest_for_path(name)
            if latest is not None and latest["sha256"] == sha:  # the same drop, touched or copied again
                journal.update(latest["id"], stamp=before)
            else:
                journal.add(
                    name=same["name"],
                    drop_path=name,
                    kind=kind,
                    sha256=sha,
                    stamp=before,
                    state="skipped",
                    out=same["out"],
                    cause=why,
                    finished=time.time(),
                )
            return self.folder.event(None, "skipped", drop=name, reason=why)
        job_name = (
            same["name"] if same is not None else self._unique_name(self._base_name(name, content), sha)
        )
        self._queue(name, kind, sha, before, content, template, job_name, rerun=same is not None)
        return "queued"

    def _base_name(self, name: str, content: bytes | None) -> str:
        """A pipeline's own `name:` if it is a safe folder name, else the drop's name as a slug."""
        if content is not None:
            try:
                raw = parse_yaml(content, name)
            except UserError:  # not YAML, aliases, too deep: the job will say so
                raw = None
            wanted = raw.get("name") if isinstance(raw, dict) else None
            if isinstance(wanted, str) and NAME_RE.fullmatch(wanted) and len(wanted) <= 80:
                return wanted
        return slug(drop_stem(name))

    def _unique_name(self, base: str, sha: str) -> str:
        """`base`, unless another content owns it: then base-<hash prefix>, so results never mix."""
        name, digits = base, sha.removeprefix("x:")
        for n in (8, 16, 64):
            if not self.folder.journal.name_taken(name, sha):
                break
            name = f"{base[: 99 - n]}-{digits[:n]}"
        return name

    def _read_template(self) -> tuple[bytes, str]:
        """The template's bytes and its name in messages. DROP/template.yaml is put there by whoever
        writes drops: it is not followed through a symbolic link (it could lead to any file the
        daemon can read, and errors would quote it), nor waited on if it is a FIFO."""
        path = self.template or self.folder.drop / TEMPLATE_NAME
        named = self.template is not None  # --template: the operator's own file, which may be a link
        try:
            return files.read_regular(path, "the template", MAX_PIPELINE_BYTES, follow=named), (
                str(path) if named else TEMPLATE_NAME
            )
        except FileNotFoundError:
            if named:
                raise IntakeError(f"cannot read the template {shown(path)}: it no longer exists") from None
            return DEFAULT_TEMPLATE.encode(), "the built-in template"
        except UserError as exc:
            raise IntakeError(str(exc)) from None

    def _queue(
        self,
        name: str,
        kind: str,
        sha: str,
        before: str,
        content: bytes | None,
        template: tuple[bytes, str] | None,
        job_name: str,
        rerun: bool,
    ) -> None:
        folder = self.folder
        job_dir = folder.jobs_dir / job_name
        if kind == "pipeline":
            config, shown_as, overrides = job_dir / name, name, []
            files.write_bytes(config, content)
        else:
            config, shown_as = job_dir / TEMPLATE_NAME, template[1]
            files.write_bytes(config, template[0])
            overrides = ["data.dataset=imagefolder", f"data.root={json.dumps(str(folder.drop / name))}"]
        # Always: the safe job name, and the job's own cache (never a folder a config picks).
        overrides += [f"name={json.dumps(job_name)}", f"data.cache_dir={json.dumps(str(job_dir / 'cache'))}"]
        files.write_json(
            job_dir / "job.json",
            {
                "name": job_name,
                "drop": name,
                "config": str(config),
                "shown_as": shown_as,
                # A dropped pipeline's errors may quote it; the template's may not (see _read_template).
                "quote": kind == "pipeline" or self.template is not None,
                "overrides": overrides,
                "out": str(folder.out),
                "cwd": str(folder.drop),
            },
        )
        job_id = folder.journal.add(
            name=job_name,
            drop_path=name,
            kind=kind,
            sha256=sha,
            stamp=before,
            state="queued",
            out=str(folder.out),
            fresh=int(rerun),
        )
        folder.event(job_name, "queued", id=job_id, drop=name, rerun="yes" if rerun else None)

    def _reject(self, name: str, kind: str, before: str, cause: str, detail: str = "") -> None:
        """A drop that cannot run at all: failed at once, with its error file."""
        cause = shown(" ".join(cause.splitlines()))
        pseudo = (
            "x:" + hashlib.sha256(os.fsencode(name) + f"\0{before}".encode()).hexdigest()
        )  # no content hash
        job_name = self._unique_name(slug(drop_stem(name)), pseudo)
        error = self.folder.write_error(job_name, name, cause, None, None, detail)
        now = time.time()
        job_id = self.folder.journal.add(
            name=job_name,
            drop_path=name,
            kind=kind,
            sha256=pseudo,
            stamp=before,
            state="failed",
            out=str(self.folder.out),
            cause=cause,
            started=now,
            finished=now,
        )
        self.folder.event(job_name, "failed", id=job_id, drop=name, cause=cause, error=error)
