"""The `dsrpipe` command's entry point (the console script and `python -m dsrpipe`): SIGTERM and
SIGINT are handled from its first line, before the heavy imports (dsrpipe.stopping)."""

import sys

from . import stopping  # the standard library's signal and threading, and dsrpipe.errors: quick


@stopping.quiet  # it reads the record of a signal: one that arrives now must not escape it
def main() -> int | str | None:
    stopping.install()
    stopped_by = None
    try:
        status = _command()
    except BaseException as exc:  # outside every command: a signal, or a bug in none of them
        if not isinstance(exc, KeyboardInterrupt) and stopping.received() is None:
            raise
        status, stopped_by = None, stopping.signal_of(exc) if isinstance(exc, KeyboardInterrupt) else None
    signum = stopping.finish() or stopped_by
    if signum is not None:  # whatever the command's own ending: a signal asked it to stop
        stopping.announce(signum)
        status = stopping.exit_code(signum)
    return status


def _command() -> int | str | None:
    # Imported here, not at the top: the handlers are installed first (main's first line), so
    # that a signal during the imports is held until they finish (dsrpipe.stopping). The command
    # named imports its own module then (dsrpipe.cli).
    from .cli import app

    try:
        app(prog_name="dsrpipe")
    except SystemExit as exc:  # how click ends, even on success
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
