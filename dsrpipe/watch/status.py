"""`dsrpipe status`: the journal of a drop folder, read-only, and whether a daemon serves it."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import lock_holder, shown
from .drops import JOURNAL_NAME, STATE_DIR
from .journal import Journal


def daemon_pid(drop: Path) -> int | None:
    """The pid of the daemon watching `drop`, if one is alive (read from its lock file)."""
    pid = lock_holder(Path(drop) / STATE_DIR / "lock")
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:
        return pid
    except OSError:
        return None
    try:  # after a kill -9 the pid may since belong to another process
        return pid if b"watch" in Path(f"/proc/{pid}/cmdline").read_bytes() else None
    except OSError:  # no /proc here
        return pid


def status_report(drop: Path, *, as_json: bool = False) -> str:
    drop = Path(drop).expanduser()
    if not drop.is_dir():
        raise UserError(f"drop folder {shown(drop)} does not exist")
    path = drop / STATE_DIR / JOURNAL_NAME
    rows: list[dict[str, Any]] = []
    try:
        journal = Journal(path, readonly=True)
    except FileNotFoundError:
        pass  # no daemon has served the folder yet
    else:
        rows = journal.jobs()
        journal.close()
    pid = daemon_pid(drop)
    if as_json:
        return json.dumps({"drop": str(drop.resolve()), "daemon_pid": pid, "jobs": rows}, indent=2)
    lines = [f"{shown(drop)}: " + (f"watched (dsrpipe watch pid {pid})" if pid else "not watched now")]
    if not rows:
        return "\n".join(lines + ["no jobs yet"])
    now = time.time()
    table = [("ID", "JOB", "STATE", "DROP", "UPDATED", "DURATION", "DETAIL")]
    for r in rows:
        end = r["finished"] or (now if r["state"] == "running" else None)
        duration = f"{end - r['started']:.1f}s" if r["started"] and end and r["state"] != "skipped" else ""
        updated = time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(r["finished"] or r["started"] or r["created"])
        )
        detail = {
            "done": str(Path(r["out"]) / r["name"] / "model.onnx"),
            "running": f"attempt {r['attempts']}, "
            + (
                f"{r['engine']} job {r['engine_job']}"
                + (f" at {r['engine_address']}" if r.get("engine_address") else "")
                if r.get("engine_job")
                else f"pid {r['pid']}"
            ),
            "queued": f"attempt {r['attempts'] + 1}" if r["attempts"] else "waiting",
        }.get(r["state"], r["cause"] or "")
        table.append((str(r["id"]), r["name"], r["state"], r["drop_path"], updated, duration, detail))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]
    counts = Counter(r["state"] for r in rows)
    lines.append(f"{len(rows)} drops: " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)
