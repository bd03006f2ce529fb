"""`dsrpipe watch`: a daemon that runs every pipeline or dataset dropped into a folder, exactly once.

    <drop>/exp1.yaml            a pipeline: run as it is                      → <out>/exp1/
    <drop>/flowers/             a dataset (train/ + test/ or val/ class folders), or
    <drop>/flowers.tar.gz       an archive of one (.tar.gz .tgz .tar .zip): run the template
                                pipeline on it as `imagefolder`              → <out>/flowers/
    <drop>/template.yaml        the template for dataset drops (else --template, else built in)
    <drop>/<job>.error.txt      written when a job fails: the cause, then the log's tail
    <drop>/.dsrpipe/            state: journal.sqlite, lock, jobs/<job>/ (job.json, job.log, ...)

A drop is taken once it is quiet: a file once its size and mtime stopped changing for the quiet
period, a folder once no file event touched it for that long (or a `.ready` file appears in it).
The journal (dsrpipe.journal) records each drop by path and content hash: the same content is
not run twice (unless --rerun and dropped anew), changed content is a new job, and drops made
while the daemon was down are found at start. A job runs in its own process (forked from a
server that has torch imported, in its own session) so a crash cannot take the daemon down;
`run_pipeline` checkpoints every epoch, so a job interrupted in any way is simply started again
and resumes. Job names: the pipeline's `name:` (or the drop's file name, made a safe slug); if
another content already owns that name, `<name>-<first 8 hex of the content hash>`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import signal
import stat
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from . import files
from .config import SAFE_NAME
from .errors import UserError
from .journal import ACTIVE, Journal

log = logging.getLogger("dsrpipe.watch")

STATE_DIR = ".dsrpipe"
TEMPLATE_NAME = "template.yaml"
READY_MARKER = ".ready"
ERROR_SUFFIX = ".error.txt"
PIPELINE_SUFFIXES = (".yaml", ".yml")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")  # as dsrpipe.data (not imported: it imports torch)
NAME_RE = re.compile(SAFE_NAME)
MAX_PIPELINE_BYTES = 2**20
MAX_ATTEMPTS = 10  # starts of one job (each interruption costs one) before it is failed
STOP_TIMEOUT = 30.0  # seconds a job gets to stop on SIGTERM before SIGKILL
LOG_TAIL = 40  # log lines copied into <job>.error.txt
TICK = 0.2  # seconds between looks at pending drops and running jobs
EXIT_BUSY = 75  # a job process found its job held by another process (an orphan not yet gone)
EXIT_INTERRUPTED = 130
INTERRUPTED = {EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGINT, 255}  # 255: the fork server died
# Imported once by the fork server, so that a job process starts in milliseconds, not seconds
# (the server skips any that fail to import: the job then imports them itself).
PRELOAD = ["dsrpipe.watch", "dsrpipe.pipeline", "sklearn.datasets", "sklearn.model_selection", "matplotlib.figure",
           "matplotlib.backends.backend_agg", "onnxscript", "torch.onnx._internal.exporter._core"]

DEFAULT_TEMPLATE = """\
# dsrpipe watch: the built-in template for dataset drops (data.dataset and data.root are set
# per drop). A small CNN trained with DSR at 90% sparsity on images resized to 64x64.
data:
  image_size: 64
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


@dataclass
class WatchOptions:
    drop: Path
    out: Path = Path("export")
    template: Path | None = None  # default: <drop>/template.yaml, else DEFAULT_TEMPLATE
    quiet: float = 5.0  # seconds a drop must stay unchanged before it is taken
    workers: int = 1
    rerun: bool = False
    once: bool = False
    log_file: Path | None = None
    max_unpacked: int | None = None  # archive caps for dataset drops; None: dsrpipe.data's
    max_files: int | None = None


# ---------------------------------------------------------------------------------------------
# Drops: what an entry is, its name, its stamp and content hash


class IntakeError(Exception):
    """A drop that cannot be taken as it is; the message is the one-line cause."""


class _Stopped(Exception):
    """Hashing was cut short because the daemon is stopping."""


def slug(text: str) -> str:
    """A safe job (folder) name from any text: [A-Za-z0-9._-], starting with a letter or digit."""
    text = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", text)).strip("-._")
    return text[:80].rstrip("-._") or "job"


def drop_stem(name: str) -> str:
    lower = name.lower()
    suffix = next((s for s in ARCHIVE_SUFFIXES + PIPELINE_SUFFIXES if lower.endswith(s)), "")
    return name[:len(name) - len(suffix)]


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5T' or a plain number of bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"cannot read size '{text}' (e.g. 500M, 20G)")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


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
    if name.endswith(ARCHIVE_SUFFIXES):
        return "archive", ""
    return None, "not a pipeline (.yaml/.yml), a dataset folder or a dataset archive (.tar.gz/.tgz/.tar/.zip)"


def is_dataset_folder(path: Path) -> bool:
    """train/ and test/ (or val/) in the folder or in its only subfolder, as dsrpipe.data reads them."""
    visible = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    return any((c / "train").is_dir() and ((c / "test").is_dir() or (c / "val").is_dir())
               for c in [path] + (visible if len(visible) == 1 else []))


def _tree(root: Path, *, strict: bool) -> list[tuple[str, os.stat_result, Path]]:
    """Everything under root (links not followed) as (relative path, lstat, path), sorted."""

    def fail(error: OSError):
        raise IntakeError(f"cannot read {error.filename}: {error.strerror}")

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
        digest.update(f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "tree:" + digest.hexdigest()[:32]


def _file_hash(path: Path, should_stop: Callable[[], bool]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            if should_stop():
                raise _Stopped
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: Path, should_stop: Callable[[], bool] = lambda: False) -> str:
    """sha256 of a file's bytes; of a folder, of its sorted relative paths, sizes and file hashes.
    A folder holding a link that leaves it, or a device, socket or pipe, is refused."""
    if not stat.S_ISDIR(path.lstat().st_mode):
        return _file_hash(path, should_stop)
    top = path.resolve()
    digest = hashlib.sha256()
    for rel, st, entry in _tree(path, strict=True):
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(entry)
            if not (entry.parent / target).resolve().is_relative_to(top):
                raise IntakeError(f"unsafe dataset folder {path.name}: '{rel}' is a link to {target}, "
                                  "outside the folder")
            content = f"link:{target}"
        elif stat.S_ISDIR(st.st_mode):
            content = "folder"
        elif stat.S_ISREG(st.st_mode):
            content = _file_hash(entry, should_stop)
        else:
            raise IntakeError(f"unsafe dataset folder {path.name}: '{rel}' is a device, socket or pipe, "
                              "not a file or folder")
        digest.update(f"{rel}\0{st.st_size if stat.S_ISREG(st.st_mode) else 0}\0{content}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The daemon


@dataclass
class _Pending:
    last: float  # monotonic time of the latest activity seen
    look: tuple  # (mode, size, mtime) at the latest look


@dataclass
class _Running:
    proc: Any  # a multiprocessing.Process
    job: dict[str, Any]
    started: float  # monotonic


class Daemon:
    def __init__(self, opts: WatchOptions):
        self.opts = opts
        self.drop, self.out = Path(opts.drop), Path(opts.out)
        self.state = self.drop / STATE_DIR
        self.jobs_dir = self.state / "jobs"
        self.pending: dict[str, _Pending] = {}
        self.running: dict[int, _Running] = {}
        self.hold: dict[int, float] = {}  # job id -> not before (monotonic)
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.dir_watches: dict[str, Any] = {}
        self.stopping, self.kill_now, self.signal_name = False, False, None
        self.observer = self.journal = self._context = None
        # Entries that are ours, not drops: never reported.
        self.own = {STATE_DIR, TEMPLATE_NAME}
        for path in (self.out, opts.template, opts.log_file):
            if path is not None and Path(path).is_relative_to(self.drop) and Path(path) != self.drop:
                self.own.add(Path(path).relative_to(self.drop).parts[0])

    # -- main loop --------------------------------------------------------------------------------

    def run(self) -> int:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        self.journal = Journal(self.state / "journal.sqlite")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info(f"watching {self.drop} -> {self.out} ({self.opts.workers} worker(s), quiet period "
                     f"{self.opts.quiet:g}s{', once' if self.opts.once else ''}{', rerun' if self.opts.rerun else ''})")
            self._recover()
            self._start_observer()
            for name in sorted(os.listdir(self.drop)):  # drops made while the daemon was down
                self._consider(name, scan=True)
            while not self.stopping:
                self._drain(TICK)
                self._check_pending()
                self._poll_jobs()
                self._start_jobs()
                if self.opts.once and not (self.pending or self.running or self.journal.jobs("queued")):
                    break
            if self.signal_name:
                log.info(f"{self.signal_name}: stopping; no new jobs")
        finally:
            self._shutdown()
            self.journal.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.truncate(0)  # no stale pid for `dsrpipe status`
            lock.close()
        log.info("stopped")
        return 0

    def _on_signal(self, signum, frame) -> None:
        self.kill_now = self.stopping  # a second signal: do not wait for jobs to stop
        self.stopping, self.signal_name = True, signal.Signals(signum).name

    def _lock(self):
        f = _hold_lock(self.state / "lock")
        if f is None:
            pid = (self.state / "lock").read_text().strip() or "?"
            raise UserError(f"{self.drop} is already watched by another dsrpipe watch (pid {pid}); stop it first")
        return f

    def _recover(self) -> None:
        """Jobs left `running` by a daemon that died: stop any process still at it, then requeue."""
        for job in self.journal.jobs("running"):
            self._stop_orphan(job)
            self.journal.update(job["id"], state="queued", pid=None)
            self._event(job["name"], "queued", id=job["id"], reason="was running when the daemon stopped; "
                        "resumes from its last checkpoint")

    def _shutdown(self) -> None:
        self.stopping = True
        if self.running:
            log.info(f"stopping {len(self.running)} running job(s); they resume from their last checkpoint "
                     "on the next start")
            for r in self.running.values():
                _signal_group(r.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.running and time.monotonic() < deadline and not self.kill_now:
                time.sleep(0.1)
                self._poll_jobs()
            for r in self.running.values():
                _signal_group(r.proc.pid, signal.SIGKILL)
                r.proc.join(10)
            self._poll_jobs()  # anything still listed stays `running`: the next start deals with it
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(5)

    # -- watching ---------------------------------------------------------------------------------

    def _start_observer(self) -> None:
        from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirModifiedEvent, DirMovedEvent,
                                     FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileModifiedEvent,
                                     FileMovedEvent, FileSystemEventHandler)
        from watchdog.observers import Observer

        events = self.events

        class Forward(FileSystemEventHandler):
            def on_any_event(self, event):
                events.put((event.event_type, os.fsdecode(event.src_path)))
                if event.dest_path:
                    events.put((event.event_type, os.fsdecode(event.dest_path)))

        # Writes only: our own reads (hashing) must not look like activity.
        self._event_filter = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent,
                              FileClosedEvent, DirCreatedEvent, DirModifiedEvent, DirMovedEvent, DirDeletedEvent]
        self._handler = Forward()
        self.observer = Observer()
        # The drop folder itself, not recursively: its state folder and caches stay unwatched.
        try:
            self.observer.schedule(self._handler, str(self.drop), recursive=False, event_filter=self._event_filter)
        except OSError as exc:  # e.g. out of inotify instances
            raise UserError(f"cannot watch {self.drop}: {exc}") from None
        self.observer.start()

    def _watch_folder(self, name: str) -> None:
        """Watch a top-level folder recursively, to see files arrive anywhere inside it."""
        if name not in self.dir_watches:
            try:
                self.dir_watches[name] = self.observer.schedule(
                    self._handler, str(self.drop / name), recursive=True, event_filter=self._event_filter)
            except OSError as exc:  # e.g. out of inotify watches: readiness falls back to the quiet period
                log.warning(f"cannot watch {name}/ for changes: {exc}")

    def _unwatch_folder(self, name: str) -> None:
        watch = self.dir_watches.pop(name, None)
        if watch is not None:
            try:
                self.observer.unschedule(watch)
            except Exception:  # its emitter may already be gone with the folder
                pass

    def _drain(self, timeout: float) -> None:
        try:
            items = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return
        while True:
            try:
                items.append(self.events.get_nowait())
            except queue.Empty:
                break
        touched = {}
        for kind, path in items:
            rel = os.path.relpath(path, self.drop)
            if rel == "." or rel.startswith(".."):
                continue
            top = rel.split(os.sep)[0]
            if kind in ("deleted", "moved") and rel == top:
                self._unwatch_folder(top)  # a new folder of the same name needs a new watch
            touched[top] = None
        for name in touched:
            self._consider(name)

    def _consider(self, name: str, scan: bool = False) -> None:
        """Note activity on a top-level entry; it becomes a drop once quiet (see _check_pending)."""
        if name.startswith(".") or name.endswith(ERROR_SUFFIX) or name in self.own:
            return
        path = self.drop / name
        try:
            st = path.lstat()
        except OSError:  # gone
            self.pending.pop(name, None)
            self._unwatch_folder(name)
            return
        kind, why = entry_kind(path, st)
        if kind is None:
            self.pending.pop(name, None)
            self._ignore(name, why)
            return
        if kind == "folder":
            self._watch_folder(name)
        if scan and self._unchanged(name, path):
            return
        now = time.monotonic()
        if name in self.pending:
            self.pending[name].last = now
        else:
            self.pending[name] = _Pending(now, _look(st))

    def _unchanged(self, name: str, path: Path) -> bool:
        latest = self.journal.latest_for_path(name)
        try:
            return latest is not None and latest["stamp"] == stamp(path)
        except OSError:
            return False

    def _check_pending(self) -> None:
        now = time.monotonic()
        for name, pending in list(self.pending.items()):
            if self.stopping:
                return
            path = self.drop / name
            try:
                st = path.lstat()
            except OSError:
                del self.pending[name]
                continue
            look = _look(st)
            if look != pending.look:  # still being written
                pending.look, pending.last = look, now
                continue
            marked = stat.S_ISDIR(st.st_mode) and (path / READY_MARKER).exists()
            if marked or now - pending.last >= self.opts.quiet:
                del self.pending[name]
                self._intake(name)

    def _ignore(self, name: str, why: str) -> None:
        if self.journal.first_ignore(name, why):
            log.info(f"ignored {name}: {why}")

    # -- intake: a quiet drop becomes a job, a skipped duplicate or a rejection --------------------

    def _intake(self, name: str) -> None:
        path = self.drop / name
        try:
            kind, why = entry_kind(path, path.lstat())
            if kind is None:
                return self._ignore(name, why)
            if kind == "folder" and not is_dataset_folder(path):
                return self._ignore(name, "a folder without train/ and test/ (or val/) class folders")
            kind = "pipeline" if kind == "pipeline" else "dataset"
            before = stamp(path)
            latest = self.journal.latest_for_path(name)
            if latest is not None and latest["stamp"] == before:
                return  # seen exactly like this already
            content = None
            try:
                if kind == "pipeline":
                    size = path.stat().st_size
                    if size > MAX_PIPELINE_BYTES:
                        raise IntakeError(f"{name}: {size:,} bytes is too big for a pipeline file "
                                          f"(at most {MAX_PIPELINE_BYTES:,})")
                    content = path.read_bytes()
                    sha = hashlib.sha256(content).hexdigest()
                else:
                    sha = content_hash(path, lambda: self.stopping)
            except (IntakeError, PermissionError) as exc:
                if stamp(path) != before:
                    return self._pend(name)
                cause = str(exc) if isinstance(exc, IntakeError) else f"cannot read {exc.filename}: {exc.strerror}"
                return self._reject(name, kind, before, cause)
            if stamp(path) != before:  # changed while being read: wait for it to be quiet again
                return self._pend(name)
        except _Stopped:
            return
        except FileNotFoundError:
            return  # removed meanwhile
        self._decide(name, kind, sha, before, content)

    def _pend(self, name: str) -> None:
        try:
            self.pending[name] = _Pending(time.monotonic(), _look((self.drop / name).lstat()))
        except OSError:
            pass

    def _decide(self, name: str, kind: str, sha: str, before: str, content: bytes | None) -> None:
        same = self.journal.job_for_content(sha)
        if same is not None and (same["state"] in ACTIVE or not self.opts.rerun):
            why = f"same content as job {same['name']} (#{same['id']}, {same['state']})"
            if same["state"] not in ACTIVE:
                why += "; drop it again under --rerun to run it again"
            latest = self.journal.latest_for_path(name)
            if latest is not None and latest["sha256"] == sha:  # the same drop, touched or copied again
                self.journal.update(latest["id"], stamp=before)
            else:
                self.journal.add(name=same["name"], drop_path=name, kind=kind, sha256=sha, stamp=before,
                                 state="skipped", out=same["out"], cause=why, finished=time.time())
            return self._event(None, "skipped", drop=name, reason=why)
        try:
            template = None if kind == "pipeline" else self._template()
        except IntakeError as exc:
            return self._reject(name, kind, before, str(exc))
        job_name = same["name"] if same is not None else self._unique_name(self._base_name(name, content), sha)
        self._queue(name, kind, sha, before, content, template, job_name, rerun=same is not None)

    def _base_name(self, name: str, content: bytes | None) -> str:
        """A pipeline's own `name:` if it is a safe folder name, else the drop's name as a slug."""
        if content is not None:
            try:
                raw = yaml.safe_load(content)
            except Exception:  # not YAML: the job will say so
                raw = None
            wanted = raw.get("name") if isinstance(raw, dict) else None
            if isinstance(wanted, str) and NAME_RE.fullmatch(wanted) and len(wanted) <= 80:
                return wanted
        return slug(drop_stem(name))

    def _unique_name(self, base: str, sha: str) -> str:
        """`base`, unless another content owns it: then base-<hash prefix>, so results never mix."""
        name, digits = base, sha.removeprefix("x:")
        for n in (8, 16, 64):
            if not self.journal.name_taken(name, sha):
                break
            name = f"{base[:99 - n]}-{digits[:n]}"
        return name

    def _template(self) -> tuple[bytes, str]:
        path = Path(self.opts.template) if self.opts.template else self.drop / TEMPLATE_NAME
        if self.opts.template is None and not path.exists():
            return DEFAULT_TEMPLATE.encode(), "the built-in template"
        try:
            return path.read_bytes(), (TEMPLATE_NAME if self.opts.template is None else str(path))
        except OSError as exc:
            raise IntakeError(f"cannot read the template {path}: {exc.strerror}") from None

    def _queue(self, name: str, kind: str, sha: str, before: str, content: bytes | None,
               template: tuple[bytes, str] | None, job_name: str, rerun: bool) -> None:
        # The job runs from a copy of what was hashed (or of the template as it was then), so a
        # later edit is a new drop and a resumed job sees the very settings it started with.
        job_dir = self.jobs_dir / job_name
        if kind == "pipeline":
            config, shown, overrides = job_dir / name, name, []
            files.write_bytes(config, content)
        else:
            config, shown = job_dir / TEMPLATE_NAME, template[1]
            files.write_bytes(config, template[0])
            overrides = ["data.dataset=imagefolder", f"data.root={json.dumps(str(self.drop / name))}"]
        # Always: the safe job name, and the job's own cache (never a folder a config picks).
        overrides += [f"name={json.dumps(job_name)}", f"data.cache_dir={json.dumps(str(job_dir / 'cache'))}"]
        files.write_json(job_dir / "job.json", {
            "name": job_name, "drop": name, "config": str(config), "shown_as": shown,
            "overrides": overrides, "out": str(self.out), "cwd": str(self.drop)})
        job_id = self.journal.add(name=job_name, drop_path=name, kind=kind, sha256=sha, stamp=before,
                                  state="queued", out=str(self.out), fresh=int(rerun))
        self._event(job_name, "queued", id=job_id, drop=name, rerun="yes" if rerun else None)
        self._warm_up()

    def _reject(self, name: str, kind: str, before: str, cause: str) -> None:
        """A drop that cannot run at all: failed at once, with its error file."""
        pseudo = "x:" + hashlib.sha256(f"{name}\0{before}".encode()).hexdigest()  # no content hash
        job_name = self._unique_name(slug(drop_stem(name)), pseudo)
        now = time.time()
        job_id = self.journal.add(name=job_name, drop_path=name, kind=kind, sha256=pseudo, stamp=before,
                                  state="failed", out=str(self.out), cause=cause, started=now, finished=now)
        error = self._write_error(job_name, name, cause, None, None)
        self._event(job_name, "failed", id=job_id, drop=name, cause=cause, error=error)

    # -- jobs ---------------------------------------------------------------------------------------

    def _process_context(self):
        if self._context is None:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(PRELOAD)
        return self._context

    def _warm_up(self) -> None:
        from multiprocessing import forkserver

        self._process_context()
        forkserver.ensure_running()  # imports torch & co. now, while the drop waits its turn

    def _start_jobs(self) -> None:
        now = time.monotonic()
        while not self.stopping and len(self.running) < self.opts.workers:
            job = next((j for j in self.journal.jobs("queued")
                        if j["id"] not in self.running and self.hold.get(j["id"], 0) <= now), None)
            if job is None:
                return
            self._start(job)

    def _start(self, job: dict[str, Any]) -> None:
        job_dir = self.jobs_dir / job["name"]
        if job["attempts"] >= MAX_ATTEMPTS:
            return self._fail(job, f"gave up after {job['attempts']} interrupted attempts", None, 0.0)
        if not (job_dir / "job.json").exists():
            return self._fail(job, f"the job's files are missing from {job_dir}", None, 0.0)
        if job["fresh"] and job["attempts"] == 0:  # a --rerun starts over
            shutil.rmtree(Path(job["out"]) / job["name"], ignore_errors=True)
            shutil.rmtree(job_dir / "cache", ignore_errors=True)
        attempt = job["attempts"] + 1
        self.journal.update(job["id"], state="running", attempts=attempt, started=time.time(), pid=None,
                            exit_code=None, finished=None)
        with open(job_dir / "job.log", "a") as f:
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} job {job['name']} (#{job['id']}) "
                    f"attempt {attempt} ===\n")
        (job_dir / "cause.txt").unlink(missing_ok=True)
        proc = self._process_context().Process(target=_job_process, args=(str(job_dir), self._job_settings()),
                                               name=f"dsrpipe-job-{job['name']}")
        proc.start()
        self.journal.update(job["id"], pid=proc.pid)
        self.running[job["id"]] = _Running(proc, {**job, "attempts": attempt}, time.monotonic())
        self._event(job["name"], "running", id=job["id"], attempt=attempt, pid=proc.pid)

    def _job_settings(self) -> dict[str, Any]:
        threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // self.opts.workers)
        return {"threads": threads, "max_unpacked": self.opts.max_unpacked, "max_files": self.opts.max_files}

    def _poll_jobs(self) -> None:
        for job_id, r in list(self.running.items()):
            code = r.proc.exitcode
            if code is not None:
                del self.running[job_id]
                r.proc.close()
                self._finished(r, code)

    def _finished(self, r: _Running, code: int) -> None:
        job, seconds = r.job, time.monotonic() - r.started
        job_dir = self.jobs_dir / job["name"]
        if code == 0:
            self.journal.update(job["id"], state="done", exit_code=0, pid=None, finished=time.time(), cause=None)
            (self.drop / f"{job['name']}{ERROR_SUFFIX}").unlink(missing_ok=True)  # from a failed earlier run
            shutil.rmtree(job_dir / "cache", ignore_errors=True)
            return self._event(job["name"], "done", id=job["id"], duration=seconds,
                               model=Path(job["out"]) / job["name"] / "model.onnx")
        if code == 255:  # the fork server went away: its job may still be running
            self._stop_orphan(job)
        if code == EXIT_BUSY or (code not in (2, 3) and (self.stopping or code in INTERRUPTED)):
            self.journal.update(job["id"], state="queued", pid=None, exit_code=code)
            if code == EXIT_BUSY:
                self.hold[job["id"]] = time.monotonic() + 5
            return self._event(job["name"], "queued", id=job["id"], duration=seconds,
                               reason="interrupted; resumes from its last checkpoint")
        try:
            cause = (job_dir / "cause.txt").read_text().strip()
        except OSError:
            cause = ""
        if not cause:
            cause = (f"the job process was killed by {signal.Signals(-code).name}" if code < 0 else
                     f"the job process exited with code {code}")
        self._fail(job, cause, code, seconds)

    def _fail(self, job: dict[str, Any], cause: str, code: int | None, seconds: float) -> None:
        cause = " ".join(cause.split("\n"))
        self.journal.update(job["id"], state="failed", exit_code=code, pid=None, finished=time.time(), cause=cause)
        job_dir = self.jobs_dir / job["name"]
        shutil.rmtree(job_dir / "cache", ignore_errors=True)
        error = self._write_error(job["name"], job["drop_path"], cause, code, job_dir / "job.log")
        self._event(job["name"], "failed", id=job["id"], duration=seconds, cause=cause, error=error)

    def _write_error(self, job_name: str, drop: str, cause: str, code: int | None, log_path: Path | None) -> Path:
        lines = [cause, "", f"job: {job_name}", f"drop: {drop}"]
        if code is not None:
            lines.append(f"exit code: {code}")
        if log_path is not None and log_path.exists():
            tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            lines += [f"log: {log_path}", "", f"--- last {len(tail)} lines of the log ---", *tail]
        path = self.drop / f"{job_name}{ERROR_SUFFIX}"
        files.write_text(path, "\n".join(lines) + "\n")
        return path

    def _stop_orphan(self, job: dict[str, Any]) -> None:
        """A job process from an earlier daemon (or fork server) may still hold its job: stop it.
        Its job lock says whether it is alive, and holds its pid."""
        lock_path = self.jobs_dir / job["name"] / "job.lock"
        if not lock_path.exists():
            return
        with open(lock_path, "a+") as f:
            if _try_lock(f):
                return
            f.seek(0)
            text = f.read().strip()
            pid = int(text) if text.isdigit() else job["pid"]
            self._event(job["name"], "stopping", id=job["id"], pid=pid,
                        reason="a job process from an earlier daemon is still running")
            for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 10.0)):
                if pid:
                    _signal_group(pid, sig)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline:
                    if _try_lock(f):
                        return
                    time.sleep(0.1)
        log.warning(f"job {job['name']}: process {pid} would not stop; its next attempt waits for it")

    def _event(self, job: str | None, state: str, **fields: Any) -> None:
        """One log line per event: job=<name> state=<state> key=value ..."""
        parts = ([f"job={job}"] if job else []) + [f"state={state}"]
        for key, value in fields.items():
            if value is None:
                continue
            text = f"{value:.1f}s" if key == "duration" else str(value)
            parts.append(f"{key}={json.dumps(text) if _NEEDS_QUOTES.search(text) or not text else text}")
        log.info(" ".join(parts))


_NEEDS_QUOTES = re.compile(r'[\s"]')


def _look(st: os.stat_result) -> tuple:
    return st.st_mode, st.st_size, st.st_mtime_ns


def _hold_lock(path: Path):
    """Open `path` and take its lock for as long as the file stays open, with our pid written
    in it (for `dsrpipe status` and for stopping orphans); None if another process holds it."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(f, fcntl.LOCK_UN)
    return True


def _signal_group(pid: int, sig: int) -> None:
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


# ---------------------------------------------------------------------------------------------
# The job process


def _job_process(job_dir: str, settings: dict[str, Any]) -> None:
    """Entry point in the forked job process: own session, output to the job log."""
    os.setsid()
    fd = os.open(Path(job_dir) / "job.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.exit(job_main(Path(job_dir), settings))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def job_main(job_dir: Path, settings: dict[str, Any] | None = None) -> int:
    """Run one job (`run_pipeline` on the job's config copy) and return its exit code: 0 done,
    2 bad input, 3 validation failed, 130 interrupted, 75 job busy, 1 a bug. Also runs by hand:
    `python -m dsrpipe.watch <drop>/.dsrpipe/jobs/<job>`."""
    settings = settings or {}
    spec = json.loads((job_dir / "job.json").read_text())
    lock = _hold_lock(job_dir / "job.lock")  # held until this process ends, however it ends
    if lock is None:
        print("error: another process is running this job", file=sys.stderr, flush=True)
        return EXIT_BUSY
    signal.signal(signal.SIGTERM, _interrupt)  # stop between two steps; epochs are checkpointed
    signal.signal(signal.SIGINT, _interrupt)
    os.chdir(spec["cwd"])  # a pipeline's relative paths are relative to the drop folder
    try:
        from .config import load_pipeline

        cfg = load_pipeline(spec["config"], spec["overrides"])
        import torch

        from . import data
        from .pipeline import outputs, run_pipeline

        if settings.get("threads"):
            torch.set_num_threads(settings["threads"])
        if settings.get("max_unpacked"):
            data.MAX_ARCHIVE_BYTES = settings["max_unpacked"]
        if settings.get("max_files"):
            data.MAX_ARCHIVE_FILES = settings["max_files"]
        run_pipeline(cfg, Path(spec["out"]), progress=False)
        print(outputs(Path(spec["out"]), cfg)["onnx"], flush=True)
        return 0
    except UserError as exc:
        cause, code = str(exc).replace(spec["config"], spec["shown_as"]), exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: completed epochs are checkpointed; the job resumes from there",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: the traceback goes to the job log
        traceback.print_exc()
        cause, code = f"internal error: {type(exc).__name__}: {exc}", 1
    print(f"error: {cause}", file=sys.stderr, flush=True)
    files.write_text(job_dir / "cause.txt", cause + "\n")
    return code


# ---------------------------------------------------------------------------------------------
# Commands


def watch(opts: WatchOptions) -> int:
    drop = Path(opts.drop).expanduser()
    if not drop.is_dir():
        raise UserError(f"drop folder {drop} {'is not a folder' if drop.exists() else 'does not exist'}")
    drop = drop.resolve()
    out = Path(opts.out).expanduser().resolve()
    if out == drop:
        raise UserError("--out must not be the drop folder itself")
    template = Path(opts.template).expanduser().resolve() if opts.template else None
    if template is not None and not template.is_file():
        raise UserError(f"template {template} does not exist")
    if opts.workers < 1 or opts.quiet < 0:
        raise UserError("--workers must be at least 1 and --quiet-period at least 0")
    try:
        (drop / STATE_DIR).mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the state folder {drop / STATE_DIR}: {exc.strerror}") from None
    log_file = Path(opts.log_file).expanduser().resolve() if opts.log_file else None
    _setup_logging(log_file)
    return Daemon(WatchOptions(**{**opts.__dict__, "drop": drop, "out": out, "template": template,
                                  "log_file": log_file})).run()


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
            handlers.append(logging.FileHandler(log_file))
        except OSError as exc:
            raise UserError(f"cannot write the log file {log_file}: {exc.strerror}") from None
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)


def daemon_pid(drop: Path) -> int | None:
    """The pid of the daemon watching `drop`, if one is alive (read from its lock file)."""
    try:
        pid = int((Path(drop) / STATE_DIR / "lock").read_text().strip())
        os.kill(pid, 0)
    except PermissionError:
        return pid
    except (OSError, ValueError):
        return None
    try:  # after a kill -9 the pid may since belong to another process
        return pid if b"watch" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
    except OSError:  # no /proc here
        return pid


def status_report(drop: Path, *, as_json: bool = False) -> str:
    drop = Path(drop).expanduser()
    if not drop.is_dir():
        raise UserError(f"drop folder {drop} does not exist")
    path = drop / STATE_DIR / "journal.sqlite"
    rows: list[dict[str, Any]] = []
    if path.exists():
        journal = Journal(path, readonly=True)
        rows = journal.jobs()
        journal.close()
    pid = daemon_pid(drop)
    if as_json:
        return json.dumps({"drop": str(drop.resolve()), "daemon_pid": pid, "jobs": rows}, indent=2)
    lines = [f"{drop}: " + (f"watched (dsrpipe watch pid {pid})" if pid else "not watched now")]
    if not rows:
        return "\n".join(lines + ["no jobs yet"])
    now = time.time()
    table = [("ID", "JOB", "STATE", "DROP", "UPDATED", "DURATION", "DETAIL")]
    for r in rows:
        end = r["finished"] or (now if r["state"] == "running" else None)
        duration = f"{end - r['started']:.1f}s" if r["started"] and end and r["state"] != "skipped" else ""
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["finished"] or r["started"] or r["created"]))
        detail = {"done": str(Path(r["out"]) / r["name"] / "model.onnx"),
                  "running": f"attempt {r['attempts']}, pid {r['pid']}",
                  "queued": f"attempt {r['attempts'] + 1}" if r["attempts"] else "waiting",
                  }.get(r["state"], r["cause"] or "")
        table.append((str(r["id"]), r["name"], r["state"], r["drop_path"], updated, duration, detail))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]
    counts = Counter(r["state"] for r in rows)
    lines.append(f"{len(rows)} drops: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)


if __name__ == "__main__":  # a job by hand: python -m dsrpipe.watch <drop>/.dsrpipe/jobs/<job>
    sys.exit(job_main(Path(sys.argv[1])))
