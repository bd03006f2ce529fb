"""Names: file names as text (one home below the errors that quote them and the file helpers that
log them), and what a run name may be."""

from __future__ import annotations

import os

SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a run name is a folder name: no paths, no surprises


def shown(name: str | os.PathLike) -> str:
    """A file name or path as text fit for a message, a log line or a database: bytes that are not
    UTF-8 (which Python holds as surrogate escapes) become \\xNN, control characters \\n, \\t, ..."""
    try:
        text = os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        text = os.fspath(name).encode("utf-8", "backslashreplace").decode()
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
