"""Readiness: which top-level entries of the drop folder are ready to be taken.

Watchdog events (writes only: our own reads must not look like activity) mark an entry active.
It is ready once no event touched it and its (mode, size, mtime) stayed the same for the quiet
period, or at once when it is a folder holding a `.ready` file. Each top-level folder gets its
own recursive watch, so files arriving anywhere inside it count; the drop folder itself is
watched alone, so the state folder and caches stay unwatched.
"""

from __future__ import annotations

import math
import os
import queue
import stat
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ..errors import UserError
from ..files import disk_full, shown
from .drops import ERROR_SUFFIX, READY_MARKER, entry_kind, stamp
from .folder import DropFolder, log


@dataclass
class _Pending:
    last: float  # monotonic time of the latest activity seen
    look: tuple  # (mode, size, mtime) at the latest look


def _look(st: os.stat_result) -> tuple:
    return st.st_mode, st.st_size, st.st_mtime_ns


# The events that count as activity: writes only (our own reads must not look like activity).
_WRITES = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


class _Forward(FileSystemEventHandler):
    """Puts each event's paths on a queue, as (event type, path): the loop reads them there."""

    def __init__(self, events: queue.SimpleQueue[tuple[str, str]]):
        super().__init__()
        self.events = events

    def on_any_event(self, event):
        self.events.put((event.event_type, os.fsdecode(event.src_path)))
        if event.dest_path:
            self.events.put((event.event_type, os.fsdecode(event.dest_path)))


class Readiness:
    def __init__(
        self, folder: DropFolder, quiet: float, own: set[str], guard: Callable[[str], AbstractContextManager]
    ):
        self.folder, self.quiet = folder, quiet
        self.own = own  # top-level names that are ours, not drops: never reported
        self.guard = guard  # guard(name): an unexpected error inside fails that drop, not the daemon
        self.pending: dict[str, _Pending] = {}
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.dir_watches: dict[str, Any] = {}
        self.observer = None

    def start(self) -> None:
        self._handler = _Forward(self.events)
        self.observer = Observer()
        try:
            self.observer.schedule(
                self._handler, str(self.folder.drop), recursive=False, event_filter=_WRITES
            )
        except OSError as exc:  # e.g. out of inotify instances
            raise UserError(f"cannot watch {shown(self.folder.drop)}: {exc}") from None
        self.observer.start()

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(5)

    def scan(self) -> None:
        """Every entry there now: drops made while the daemon was down (unchanged ones are skipped)."""
        for name in sorted(os.listdir(self.folder.drop)):
            self._look_at(name, scan=True)

    def wait(self, timeout: float) -> None:
        """Take the events of up to `timeout` seconds: each top-level entry they touched is pending."""
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
            rel = os.path.relpath(path, self.folder.drop)
            if rel == "." or rel.startswith(".."):
                continue
            top = rel.split(os.sep)[0]
            if kind in ("deleted", "moved") and rel == top:
                self._unwatch_folder(top)  # a new folder of the same name needs a new watch
            touched[top] = None
        for name in touched:
            self._look_at(name)

    def _look_at(self, name: str, scan: bool = False) -> None:
        try:
            with self.guard(name):
                self._consider(name, scan)
        except Exception as exc:
            if not disk_full(exc):
                raise
            self.pend(name, at_once=True)  # the intake meets the full disk again, and waits for space

    def ready(self) -> list[str]:
        """Pending entries that are quiet now, or marked ready; they leave the pending list."""
        now, ready = time.monotonic(), []
        for name, pending in list(self.pending.items()):
            del self.pending[name]  # back below while it settles; not if it is gone or its look failed
            with self.guard(name):
                settled = self._settled(name, pending, now)
                if settled:
                    ready.append(name)
                elif settled is not None:
                    self.pending[name] = pending
        return ready

    def _settled(self, name: str, pending: _Pending, now: float) -> bool | None:
        """True: quiet for the quiet period, or marked ready; False: not yet; None: gone."""
        path = self.folder.drop / name
        try:
            st = path.lstat()
        except OSError:
            return None
        look = _look(st)
        if look != pending.look:  # still being written
            pending.look, pending.last = look, now
            return False
        marked = stat.S_ISDIR(st.st_mode) and (path / READY_MARKER).exists()
        return marked or now - pending.last >= self.quiet

    def pend(self, name: str, at_once: bool = False) -> None:
        """Wait for `name` to be quiet again (it changed while it was being read); `at_once`: it
        was ready, and is again at the next look unless it changes (the disk was full)."""
        try:
            look = _look((self.folder.drop / name).lstat())
        except OSError:
            return
        self.pending[name] = _Pending(-math.inf if at_once else time.monotonic(), look)

    def _consider(self, name: str, scan: bool = False) -> None:
        """Note activity on a top-level entry; it becomes a drop once quiet (see ready)."""
        if name.startswith(".") or name.endswith(ERROR_SUFFIX) or name in self.own:
            return
        path = self.folder.drop / name
        try:
            st = path.lstat()
        except OSError:  # gone
            self.pending.pop(name, None)
            self._unwatch_folder(name)
            return
        kind, why = entry_kind(path, st)
        if kind is None:
            self.pending.pop(name, None)
            return self.folder.ignore(name, why)
        if kind == "folder":
            self._watch_folder(name)
        if scan and self._unchanged(name):
            return
        if name in self.pending:
            self.pending[name].last = time.monotonic()
        else:
            self.pending[name] = _Pending(time.monotonic(), _look(st))

    def _unchanged(self, name: str) -> bool:
        latest = self.folder.journal.latest_for_path(name)
        try:
            return latest is not None and latest["stamp"] == stamp(self.folder.drop / name)
        except OSError:
            return False

    def _watch_folder(self, name: str) -> None:
        """Watch a top-level folder recursively, to see files arrive anywhere inside it."""
        if name not in self.dir_watches:
            try:
                self.dir_watches[name] = self.observer.schedule(
                    self._handler,
                    str(self.folder.drop / name),
                    recursive=True,
                    event_filter=_WRITES,
                )
            except OSError as exc:  # e.g. out of inotify watches: readiness falls back to the quiet period
                log.warning(f"cannot watch {shown(name)}/ for changes: {exc}")

    def _unwatch_folder(self, name: str) -> None:
        watch = self.dir_watches.pop(name, None)
        if watch is not None:
            try:
                self.observer.unschedule(watch)
            except Exception:  # its emitter may already be gone with the folder
                pass
