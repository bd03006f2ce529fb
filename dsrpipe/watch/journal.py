"""The `dsrpipe watch` journal: one SQLite row per drop, so that every drop is run exactly once,
across crashes and restarts. Only the daemon writes it; `dsrpipe status` reads it.

A row is a drop (path + content hash) and, unless it was skipped, the job that runs it:
  queued → running → done | failed        (running → queued when a job is interrupted)
  skipped                                 (the same content was already run, or is queued)

Drop names are stored as `files.shown(name)`: text, whatever bytes the name holds. A journal
that SQLite cannot read is a UserError that says how to recover, never a traceback.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from .. import files
from ..errors import DiskFull, UserError
from ..files import shown

ACTIVE = ("queued", "running")
STATES = ACTIVE + ("done", "failed", "skipped")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    name      TEXT NOT NULL,              -- job name: <out>/<name>/ and <drop folder>/<name>.error.txt
    drop_path TEXT NOT NULL,              -- the drop, relative to the drop folder
    kind      TEXT NOT NULL,              -- pipeline | dataset
    sha256    TEXT NOT NULL,              -- content hash of the drop
    stamp     TEXT NOT NULL,              -- sizes + mtimes when hashed: unchanged drops are not re-hashed
    state     TEXT NOT NULL,              -- queued | running | done | failed | skipped
    out       TEXT NOT NULL,              -- the output folder the job writes <name>/ into
    fresh     INTEGER NOT NULL DEFAULT 0, -- a --rerun: clear <out>/<name>/ before its first attempt
    attempts  INTEGER NOT NULL DEFAULT 0,
    pid       INTEGER,                    -- the job process, while running
    engine    TEXT,                       -- the executor of its latest attempt: ray | slurm (local: NULL)
    engine_job TEXT,                      -- the engine's id of that attempt's job (re-attached on restart)
    engine_address TEXT,                  -- ray: the cluster that runs it (NULL: the daemon's own local Ray)
    exit_code INTEGER,
    cause     TEXT,                       -- failed: the one-line cause; skipped: why
    created   REAL NOT NULL,
    started   REAL,                       -- start of the latest attempt
    finished  REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_hash ON jobs (sha256);
CREATE INDEX IF NOT EXISTS jobs_by_path ON jobs (drop_path);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs (name);
CREATE TABLE IF NOT EXISTS ignored (   -- entries that are not drops, reported once each
    path   TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at     REAL NOT NULL
);
"""


class Journal:
    def __init__(self, path: str | Path, *, readonly: bool = False):
        path = Path(path).absolute()
        # Looked at first as files.open_regular does (no link, no FIFO; a permission problem is
        # said as such, not taken for corruption); SQLite then opens it without following a link.
        # Missing, it is created (readonly: FileNotFoundError, for the caller to say so).
        fd = files.open_regular(path, "the watch journal", write=not readonly)
        try:
            before = os.fstat(fd).st_ino
        finally:
            os.close(
                fd
            )  # before SQLite takes any lock: closing a descriptor drops a process's locks on a file
        uri = f"{path.as_uri()}?nofollow=1" + ("&mode=ro" if readonly else "")
        try:
            # Autocommit (writer): every statement is its own durable transaction (synchronous=FULL).
            self.db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None if not readonly else "")
            if os.stat(path, follow_symlinks=False).st_ino != before:
                raise UserError(f"the watch journal {path} was replaced while it was opened; start again")
            if not readonly:
                self.db.execute("PRAGMA synchronous = FULL")
                self.db.executescript(SCHEMA)
                columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
                for column in ("engine", "engine_job", "engine_address"):  # a journal from before them
                    if column not in columns:
                        self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
        except sqlite3.DatabaseError as exc:
            if files.disk_full(exc):  # a new journal's tables find no room: not corruption
                raise DiskFull(path) from None
            if not readonly and not all(os.access(p, os.R_OK | os.W_OK) for p in (path, path.parent)):
                raise UserError(
                    f"cannot open the watch journal {path}: permission denied (the file and its folder "
                    "must be readable and writable by the user running dsrpipe watch)"
                ) from None
            raise UserError(unreadable(path, exc)) from None
        try:
            # A few thousand rows at most: checking every page costs milliseconds.
            problem = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
        except sqlite3.DatabaseError as exc:
            raise UserError(unreadable(path, exc)) from None
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    def add(self, **fields: Any) -> int:
        fields.setdefault("created", time.time())
        fields["drop_path"] = shown(fields["drop_path"])
        keys = ", ".join(fields)
        marks = ", ".join("?" * len(fields))
        return self.db.execute(
            f"INSERT INTO jobs ({keys}) VALUES ({marks})", tuple(fields.values())
        ).lastrowid

    def update(self, job_id: int, **fields: Any) -> None:
        assignments = ", ".join(f"{key} = ?" for key in fields)
        self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: int) -> dict[str, Any]:
        return dict(self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def jobs(self, *states: str) -> list[dict[str, Any]]:
        if states:
            query = f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(states))}) ORDER BY id"
            return [dict(r) for r in self.db.execute(query, states)]
        return [dict(r) for r in self.db.execute("SELECT * FROM jobs ORDER BY id")]

    def latest_for_path(self, drop_path: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT * FROM jobs WHERE drop_path = ? ORDER BY id DESC LIMIT 1", (shown(drop_path),)
        ).fetchone()
        return dict(row) if row else None

    def job_for_content(self, sha256: str) -> dict[str, Any] | None:
        """The latest job (not a skipped drop) that ran or will run this content."""
        row = self.db.execute(
            "SELECT * FROM jobs WHERE sha256 = ? AND state != 'skipped' ORDER BY id DESC LIMIT 1", (sha256,)
        ).fetchone()
        return dict(row) if row else None

    def name_taken(self, name: str, sha256: str) -> bool:
        """Whether another content already owns this job name (and so its output folder)."""
        return (
            self.db.execute(
                "SELECT 1 FROM jobs WHERE name = ? AND sha256 != ? LIMIT 1", (name, sha256)
            ).fetchone()
            is not None
        )

    def addresses(self, engine: str) -> set[str]:
        """The clusters of `engine` that the running jobs were submitted to (a local Ray of a
        daemon's own has none)."""
        return {
            job["engine_address"]
            for job in self.jobs("running")
            if job.get("engine") == engine and job.get("engine_job") and job.get("engine_address")
        }

    def first_ignore(self, path: str, reason: str) -> bool:
        """Record an ignored entry; True the first time only, so each is reported once."""
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO ignored (path, reason, at) VALUES (?, ?, ?)",
            (shown(path), reason, time.time()),
        )
        return cursor.rowcount == 1


def unreadable(path: Path, exc: Exception) -> str:
    """How to recover from a journal SQLite cannot read (corrupt, truncated, not a database)."""
    return (
        f"cannot read the watch journal {path} ({exc}): stop `dsrpipe watch`, move the file aside "
        f"(mv {path} {path}.corrupt) and start it again: it starts a new journal and takes every drop "
        "in the folder as new; a job whose outputs are complete in --out finishes without training again, "
        "the others run (from their last checkpoint), failed drops fail again"
    )
