"""How a command or a watch job ended, from the exception that ended it: the exit code
(dsrpipe.errors) and what to say. One mapping for the CLI (cli._user_errors) and the watch job
process (watch.job.job_main); each says it in its own words and place."""

from __future__ import annotations

from dataclasses import dataclass

from . import stopping
from .errors import EXIT_BUG, EXIT_USER_ERROR, UserError
from .files import disk_full
from .names import shown


@dataclass(frozen=True)
class Ending:
    code: int
    cause: str | None = None  # what was wrong (the input, the disk) or the bug; None when stopped
    signal: int | None = None  # SIGTERM or SIGINT, when a signal stopped it
    bug: bool = False  # an internal error, not bad input: its traceback is worth showing


def ending(exc: BaseException | None = None) -> Ending:
    """How the work ended: by `exc`, or (None) by finishing. Once a signal has arrived, any ending
    is a stop by that signal: by its own exception, by what it caused in code that was running
    (an ImportError or a RecursionError from a library that was initialising, another error from
    code that caught its exception), and by finishing too, if something swallowed it."""
    signum = stopping.received() or (signal_within(exc) if exc is not None else None)
    if signum is not None:
        return Ending(stopping.exit_code(signum), signal=signum)
    if exc is None:
        return Ending(0)
    if isinstance(exc, UserError):
        return Ending(exc.exit_code, str(exc))
    if disk_full(exc):  # a write outside files.atomic_path (which names its file itself)
        where = f" writing {shown(exc.filename)}" if getattr(exc, "filename", None) else ""
        return Ending(EXIT_USER_ERROR, f"the disk is full{where}: free some space and run again")
    return Ending(EXIT_BUG, f"internal error: {type(exc).__name__}: {exc}", bug=True)


def signal_within(exc: BaseException) -> int | None:
    """The signal whose exception (KeyboardInterrupt, Terminated) `exc` is, or was raised while
    handling, if any: a signal that came while no handler of this module's was installed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return stopping.signal_of(exc)
        exc = exc.__cause__ or exc.__context__
    return None
