"""SIGTERM and SIGINT, from the entry point's first line to the exit: each becomes an exception
where the process is (errors.Terminated, KeyboardInterrupt), so that every `finally` and `with`
on the way out runs, and is also recorded.

Why a record as well as the exception: an exception can be lost on its way out. Code that
catches too much may swallow it (torch's C++ initialisation takes a failed numpy import for "no
numpy" and goes on), or turn it into another error (numpy's "cannot load module more than once
per process", a RecursionError), or report it as "Exception ignored" where Python cannot raise
it (a callback from C or Rust): then it is raised again once that code has returned, silently.
Whatever ends the process after a signal arrived, `received()`
says that a signal did, and the exit code and the one line follow from it (dsrpipe.outcome).

Why deferred during imports: an exception raised while a module executes leaves it half
initialised, and a C extension's half cannot be undone within the process (the errors above,
or an abort with a core dump from inside torch's C++ initialisation). So a signal that arrives
while an import is under way is raised once the outermost import has finished: a watcher thread
looks every POLL seconds, then sends the signal again to the main thread.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable

from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL = 0.01  # seconds between two looks at whether the main thread is still importing
# The import machinery's modules, frozen (their usual names) or not (python -X frozen_modules=off).
_IMPORTLIB = {
    "importlib._bootstrap",
    "importlib._bootstrap_external",
    "_frozen_importlib",
    "_frozen_importlib_external",
}

_received: int | None = None  # the first of SIGNALS that arrived, if any
_pending: int | None = None  # a signal that arrived during an import, waiting for it to finish
_resent = False  # the watcher has sent the pending signal again: not a new one
_watcher: threading.Thread | None = None
_finishing = False  # the entry point reads the record now: a signal is only recorded
_announced = False  # the line that says the process stops for a signal is printed
# Code during which a signal is only recorded, never raised: the entry point's own steps around
# the command, which read the record after it. An exception there would escape them.
_QUIET: set = set()
_other_unraisable = sys.unraisablehook  # what reports what is not a stop


def quiet(function: Callable) -> Callable:
    """Mark `function` as one that a signal does not interrupt (only its own lines: what it calls
    is interrupted as usual, unless marked too). For the steps that read `received()`."""
    _QUIET.add(function.__code__)
    return function


def install() -> Callable[[], None] | None:
    """Handle SIGTERM and SIGINT from now on. Returns the function that puts the previous
    handlers back and forgets what arrived (for a caller in a longer-lived process: tests call
    the CLI in-process), or None where nothing was installed: not the main thread (only it may
    set handlers), or already installed (the entry point's, for the whole process). A signal
    the process was started with ignored (`nohup`, a background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if any(signal.getsignal(sig) is _handle for sig in SIGNALS):
        return None
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _handle)
    global _other_unraisable
    previous_hook = _other_unraisable = sys.unraisablehook
    sys.unraisablehook = _unraisable

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook
        _reset()

    return restore


@quiet
def received() -> int | None:
    """The signal (SIGTERM or SIGINT) that asked this process to stop, if one did."""
    return _received


@quiet
def exit_code(signum: int) -> int:
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


@quiet
def signal_of(stop: KeyboardInterrupt) -> int:
    """The signal that a stop's exception stands for."""
    return signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT


@quiet
def stop_line(signum: int, then: str = "rerun to resume") -> str:
    """The one line that says the process stops for `signum`."""
    return f"{'terminated' if signum == signal.SIGTERM else 'interrupted'}: completed epochs are checkpointed; {then}"


@quiet
def announce(signum: int, then: str = "rerun to resume") -> None:
    """Print `stop_line` to stderr, once however many ways out reach it."""
    global _announced
    if not _announced:
        _announced = True
        print(stop_line(signum, then), file=sys.stderr, flush=True)


@quiet
def finish() -> int | None:
    """The entry point's last step: from here a signal takes its default action, which ends the
    process with a status that names it (a shell shows 143 or 130); nothing is left to clean up.
    Returns the signal that arrived before, if any, raised or not."""
    global _finishing, _pending
    _finishing, _pending = True, None
    if _watcher is not None:  # it must not send the signal again once its default action is back
        _watcher.join()
    for sig in SIGNALS:
        if signal.getsignal(sig) is _handle:
            signal.signal(sig, signal.SIG_DFL)
    return _received


def _handle(signum: int, frame) -> None:
    global _received, _pending, _resent
    resent, _resent = _resent, False
    if resent and _pending is None:  # sent again by the watcher, but the stop is already raised
        return
    if _received is None:
        _received = signum
    if _finishing or (frame is not None and frame.f_code in _QUIET):
        _pending = None  # what runs now reads the record
        return
    if _importing(frame):
        _pending = _received
        _watch()
        return
    _pending = None
    raise Terminated if _received == signal.SIGTERM else KeyboardInterrupt  # the first signal's


def _unraisable(unraisable) -> None:
    """A stop raised where Python could not pass it on (it would print "Exception ignored in"):
    raised again, by the watcher, once the main thread has left that code."""
    global _pending
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _received is not None and not _finishing:
        _pending = _received
        _watch()
        return
    _other_unraisable(unraisable)


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__") in _IMPORTLIB:
            return True
        frame = frame.f_back
    return False


def _watch() -> None:
    """Send the pending signal again to the main thread once it is out of every import: a real
    signal, which also ends a sleep or a wait that it may be in by then."""
    global _watcher
    if _watcher is not None and _watcher.is_alive():
        return
    main = threading.main_thread().ident

    def deliver() -> None:
        global _resent
        while _pending is not None:
            time.sleep(POLL)
            signum = _pending
            if signum is not None and not _importing(sys._current_frames().get(main)):
                _resent = True
                signal.pthread_kill(main, signum)

    _watcher = threading.Thread(target=deliver, name="dsrpipe-deferred-signal", daemon=True)
    _watcher.start()


def _reset() -> None:
    global _received, _pending, _resent, _finishing, _announced
    _pending = None
    if _watcher is not None:
        _watcher.join()
    _received, _resent, _finishing, _announced = None, False, False, False
