"""Errors a user can act on, and the exit codes: the CLI prints them as one line and exits non-zero."""

from .names import shown

# Exit codes, for the CLI and the watch daemon's job processes alike.
EXIT_BUG = 1  # an internal error: a bug, not bad input
EXIT_USER_ERROR = 2  # bad input or an unmet requirement (UserError)
EXIT_VALIDATION = 3  # the exported model missed a threshold (ValidationFailed)
EXIT_DISK_FULL = 74  # (watch jobs) EX_IOERR: the disk was full, too full to record why in cause.txt
EXIT_BUSY = 75  # EX_TEMPFAIL: another process holds the job; try again later
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by a signal; completed epochs are checkpointed
EXIT_TERMINATED = 143  # 128 + SIGTERM: the same clean stop, asked by kill or a service manager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (dsrpipe.stopping), like Ctrl-C's KeyboardInterrupt
    (and caught with it): every `finally` and `with` on the way out runs, so checkpoints stay
    whole and temporary files are removed."""


class UserError(Exception):
    """Bad input or an unmet requirement; the message names what is wrong."""

    exit_code = EXIT_USER_ERROR


class DiskFull(UserError):
    """A write found the disk (or the quota) full; `path` is the file that was being written."""

    def __init__(self, path, message: str | None = None):
        self.path = path
        super().__init__(
            message or f"cannot write {shown(path)}: the disk is full (free some space and run again)"
        )


class ValidationFailed(UserError):
    """The exported model missed a threshold set in the pipeline (min_top1, max_abs_diff)."""

    exit_code = EXIT_VALIDATION
