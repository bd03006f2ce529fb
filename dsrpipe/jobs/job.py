"""The job process: every stage of a run (dsrpipe.pipeline) on the job's copy of its config,
confined to the drop and output folders. Its executor starts it as
`python -m dsrpipe.jobs <drop>/.dsrpipe/jobs/<job> [settings]` (forked from the daemon's warm
server, or on a worker); by hand too."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from .. import files, stopping
from ..config import Pipeline, load_pipeline
from ..data import ArchiveCaps
from ..errors import EXIT_BUSY, EXIT_DISK_FULL, UserError
from ..executors import launch
from ..executors.base import JobSpec
from ..files import exclusive_lock, release_lock, shown
from ..models.user_models import names_code
from ..outcome import ending
from ..pipeline import run_stages
from ..run import Run, load_splits


@stopping.quiet  # once job_main has returned how the job ended, a signal no longer changes it
def main(argv: list[str]) -> None:
    """`python -m dsrpipe.jobs JOB_DIR [SETTINGS]`: the job, and its exit code as the process's."""
    code = job_main(Path(argv[0]), json.loads(argv[1]) if len(argv) > 1 else None)
    stopping.finish()
    for name in ("stdout", "stderr"):  # what a full disk kept from the job log: dropped, not an exit error
        try:
            getattr(sys, name).flush()
        except OSError:
            setattr(sys, name, open(os.devnull, "w"))
    sys.exit(code)


def _threads_from_environment() -> None:
    """The executor's share of the cores, set again: a forked job's torch was set up in the server."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def job_main(job_dir: Path, settings: dict[str, Any] | None = None) -> int:
    """Run one job and return its exit code (dsrpipe.errors: 0 done, 2 bad input, 3 validation
    failed, 130 or 143 stopped by SIGINT or SIGTERM, 75 job busy, 74 the disk too full to write
    cause.txt, 1 a bug). The cause of a failure goes to cause.txt."""
    settings = settings or {}
    spec = json.loads((job_dir / "job.json").read_text())
    try:
        lock = exclusive_lock(job_dir / "job.lock")
    except OSError as exc:
        if files.disk_full(exc):  # no room for its pid
            return EXIT_DISK_FULL
        raise
    if lock is None:
        print("error: another process is running this job", file=sys.stderr, flush=True)
        return EXIT_BUSY
    try:
        return _run_job(job_dir, spec, settings)
    finally:
        # Now, not when the file object is collected: a reference cycle kept it (and the lock) until
        # the cyclic collector ran. Had the process died, the kernel would have let go of it.
        release_lock(lock)


def _run_job(job_dir: Path, spec: dict, settings: dict[str, Any]) -> int:
    """The job itself, its lock held: its exit code, its cause written to cause.txt."""
    stopping.install()  # stop between two steps, or after an import; epochs are checkpointed
    os.chdir(spec["cwd"])  # a pipeline's relative paths are relative to the drop folder
    try:
        cfg = load_pipeline(spec["config"], spec["overrides"], quote=spec.get("quote", True))
        confine_paths(cfg, [Path(spec["cwd"]), Path(spec["out"])])  # before anything is read
        refuse_code(cfg)
        _threads_from_environment()
        caps = _archive_caps(settings)
        if settings.get("nproc", 1) > 1:
            # A dataset unpacked and decoded here, once: the ranks read the folder and the cache.
            if cfg.data.dataset == "imagefolder":
                load_splits(cfg.data, caps)
            return _run_through_torchrun(spec, settings["nproc"], job_dir / "job.log")
        # Its data (a dropped dataset unpacked and decoded under the job's caps) is loaded once,
        # by the first stage that needs it, for all of them.
        run = Run(cfg, Path(spec["out"]), caps)
        with run.dir.lock():  # one owner, as for `dsrpipe run`: a job never mixes with another process's run
            run_stages(run, progress=False)
        print(run.dir.onnx, flush=True)
        end = ending()  # done, unless a signal came and something swallowed its exception
        if end.code == 0:
            return 0
    except BaseException as exc:  # every other way out gets its exit code (dsrpipe.outcome) and its cause
        end = ending(exc)
        if end.bug:  # the traceback goes to the job log
            _say(traceback.print_exc)
    if end.signal is not None:  # no cause: the runner queues the job again
        _say(
            lambda: print(
                stopping.stop_line(end.signal, "the job resumes from there"), file=sys.stderr, flush=True
            )
        )
        return end.code
    cause, code = end.cause.replace(spec["config"], spec["shown_as"]), end.code
    cause = shown(cause)
    _say(lambda: print(f"error: {cause}", file=sys.stderr, flush=True))
    try:
        files.write_text(job_dir / "cause.txt", cause + "\n")
    except Exception as exc:
        if files.disk_full(exc):  # the runner says so for us
            return EXIT_DISK_FULL
        raise
    return code


def _archive_caps(settings: dict[str, Any]) -> ArchiveCaps:
    """What a dataset archive may unpack to in this job (the daemon's --max-unpacked and
    --max-files)."""
    defaults = ArchiveCaps()
    return ArchiveCaps(
        settings.get("max_unpacked") or defaults.max_bytes, settings.get("max_files") or defaults.max_files
    )


def _say(write) -> None:
    """Write to the job log, which a full disk may refuse: the cause still goes to cause.txt."""
    try:
        write()
    except OSError as exc:
        if not files.disk_full(exc):
            raise


def _run_through_torchrun(spec: dict[str, Any], nproc: int, log: Path) -> int:
    """`dsrpipe run` on the same (already confined) config as `nproc` processes under torchrun
    (dsrpipe's one launcher), in this job's process group, so that the limits and signals of its
    executor cover them all; their rank 0 holds the run's lock. torchrun exits 1 whatever its
    ranks' codes, so the cause is their last `error:` line in the log, which also tells bad input
    from a bug."""
    args = ["run", spec["config"], "--out", spec["out"], "--no-progress"]
    for override in spec["overrides"]:
        args += ["--set", override]
    sys.stdout.flush()
    sys.stderr.flush()
    before = log.stat().st_size if log.exists() else 0
    code = launch.run_to_end(
        JobSpec("torchrun", "dsrpipe", args, log), nproc, threads=torch.get_num_threads()
    )
    if code == 0:
        return 0
    with open(log, "rb") as f:
        f.seek(before)
        lines = f.read().decode(errors="replace").splitlines()
    error = next(
        (line.removeprefix("error: ").strip() for line in reversed(lines) if line.startswith("error: ")), None
    )
    if error is not None:
        raise UserError(error)
    raise RuntimeError(f"torchrun exited with code {code} (see the job log)")


def _path_settings(section: BaseModel, prefix: str = "") -> list[tuple[str, Path]]:
    """Every path-typed setting that is set, as (dotted name, path): data.root, masks_from, ..."""
    found = []
    for name, value in section:
        if isinstance(value, BaseModel):
            found += _path_settings(value, f"{prefix}{name}.")
        elif isinstance(value, Path):
            found.append((f"{prefix}{name}", value))
    return found


def refuse_code(cfg: Pipeline) -> None:
    """Refuse a pipeline whose model is a `module:function` factory: building it would import and
    run code that whoever dropped the pipeline (or the drop folder's template) chose."""
    if names_code(cfg.model.name):
        raise UserError(
            "model.name: a watch job may not name code (module:function); only a pipeline you run "
            "yourself may (docs/security.md)"
        )


def confine_paths(cfg: Pipeline, roots: list[Path]) -> None:
    """Refuse a pipeline whose path settings lead outside `roots` (relative paths are taken from
    the working directory; `~` and symbolic links are followed first): the watch daemon runs
    untrusted pipelines, which must read and write only inside its drop and output folders."""
    allowed = [Path(root).resolve() for root in roots]
    for where, path in _path_settings(cfg):
        for candidate in {path, path.expanduser()}:  # loaders expand ~: check what they will open
            try:
                resolved = candidate.resolve()
            except (OSError, RuntimeError):  # a symbolic link loop
                resolved = None
            if resolved is None or not any(resolved.is_relative_to(root) for root in allowed):
                raise UserError(
                    f"{where}: {path} is outside {' and '.join(map(str, allowed))}; "
                    "only paths inside them are allowed here"
                )
