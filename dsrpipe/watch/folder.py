"""The drop folder as the daemon's roles share it: its paths, its journal, the event log, the
error files beside the drops, and the lock files (the daemon's, each job's)."""

from __future__ import annotations

import fcntl
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .. import files
from ..files import shown
from .drops import ERROR_SUFFIX, JOURNAL_NAME, STATE_DIR
from .journal import Journal

log = logging.getLogger("dsrpipe.watch")

LOG_TAIL = 40  # log lines copied into <job>.error.txt
_NEEDS_QUOTES = re.compile(r'[\s"]')


class DropFolder:
    def __init__(self, drop: Path, out: Path):
        self.drop, self.out = drop, out
        self.state = drop / STATE_DIR
        self.jobs_dir = self.state / "jobs"
        self.journal: Journal | None = None  # opened by the daemon once it holds the folder's lock

    def open_journal(self) -> Journal:
        self.journal = Journal(self.state / JOURNAL_NAME)
        return self.journal

    def job_dir(self, job: dict[str, Any]) -> Path:
        return self.jobs_dir / job["name"]

    def event(self, job: str | None, state: str, **fields: Any) -> None:
        """One log line per event: job=<name> state=<state> key=value ... (names shown escaped)."""
        parts = ([f"job={job}"] if job else []) + [f"state={state}"]
        for key, value in fields.items():
            if value is None:
                continue
            text = f"{value:.1f}s" if key == "duration" else shown(str(value))
            parts.append(f"{key}={json.dumps(text) if _NEEDS_QUOTES.search(text) or not text else text}")
        log.info(" ".join(parts))

    def ignore(self, name: str, why: str) -> None:
        """An entry that is not a drop: reported once."""
        if self.journal.first_ignore(name, why):
            log.info(f"ignored {shown(name)}: {why}")

    def fail(self, job: dict[str, Any], cause: str, code: int | None, seconds: float) -> None:
        """A job failed: `<job>.error.txt` beside the drop, then the journal (a job `failed` there has
        its error file), one log line."""
        cause = shown(" ".join(cause.splitlines()))
        shutil.rmtree(self.job_dir(job) / "cache", ignore_errors=True)
        error = self.write_error(job["name"], job["drop_path"], cause, code, self.job_dir(job) / "job.log")
        self.journal.update(
            job["id"], state="failed", exit_code=code, pid=None, finished=time.time(), cause=cause
        )
        self.event(job["name"], "failed", id=job["id"], duration=seconds, cause=cause, error=error)

    def write_error(
        self, job_name: str, drop: str, cause: str, code: int | None, log_path: Path | None, detail: str = ""
    ) -> Path:
        lines = [cause, "", f"job: {job_name}", f"drop: {shown(drop)}"]
        if code is not None:
            lines.append(f"exit code: {code}")
        if detail:
            lines += ["", *detail.rstrip().splitlines()]
        if log_path is not None and log_path.exists():
            tail = log_path.read_text(errors="backslashreplace").splitlines()[-LOG_TAIL:]
            lines += [f"log: {log_path}", "", f"--- last {len(tail)} lines of the log ---", *tail]
        path = self.drop / f"{job_name}{ERROR_SUFFIX}"
        files.write_text(path, "\n".join(shown(line) for line in lines) + "\n")
        return path


def try_lock(f) -> bool:
    """Whether nobody holds the lock of the open file `f` (taken and released at once)."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(f, fcntl.LOCK_UN)
    return True
