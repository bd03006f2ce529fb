"""Planning a grid's runs (each one's pipeline, validated before any starts; a run that another
starts from goes first) and running them, `--jobs` at a time, on an executor."""

from __future__ import annotations

import copy
import functools
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .. import files
from ..config import METHOD_OPTIONS, Pipeline, apply_overrides, parse_pipeline, switch_method
from ..errors import UserError
from ..executors import LOST, Executor, ExecutorOptions, JobSpec, make_executor
from ..report import Report
from ..rundir import STALE, RunDir, read_report, training_stages
from .grid import Grid, Run, cluster_resources, cluster_settings, load_grid, quotes_base, run_name
from .results import write_results


# -- planning ---------------------------------------------------------------------------------
def run_sources(grid: Grid) -> dict[str, tuple[str, str]]:
    """Per method of the grid that starts from another run (its options' `starts_from`): that
    run's method and the setting naming it. A source that trains every weight (dense) runs once per
    seed and is added where the grid lacks it; any other (frozen's dsr) is wired only where the grid
    has it (else the method's own setting names a run)."""
    methods = {grid.method_of(row) for row in grid.methods}
    sources = {}
    for method in methods:
        needed = METHOD_OPTIONS[method].starts_from
        if needed is not None and (needed in grid.methods or METHOD_OPTIONS[needed].keeps_every_weight):
            sources[method] = (needed, METHOD_OPTIONS[method].source_setting)
    return sources


def plan_runs(
    grid: Grid, grid_name: str, base: dict[str, Any], runs_dir: Path, source: str = "grid"
) -> list[Run]:
    """Every run's pipeline, validated before any starts.

    Runs that start from another run come after it: `frozen` retrains the final masks of the DSR
    run with the same sparsity and seed (when the grid has dsr), `prune` prunes the final weights
    of the dense run with the same seed (a grid with prune and no dense gets the dense runs).
    `dense` ignores sparsity, so it runs once per seed (as sparsity 0), not once per sparsity.
    Each run gets the base's sparsity options that its method takes (see config.switch_method)."""
    sources = run_sources(grid)
    rows = grid.methods + sorted({needed for needed, _ in sources.values()} - set(grid.methods))
    rows = sorted(rows, key=lambda row: grid.method_of(row) in sources)  # stable: dependants last
    runs = []
    for row in rows:
        method = grid.method_of(row)
        for sparsity in grid.sparsities_of(row):
            for seed in grid.seeds:
                name = run_name(grid_name, row, sparsity, seed)
                raw = copy.deepcopy(base)
                settings = grid.settings_of(row)
                try:
                    apply_overrides(
                        raw,
                        [f"{k}={yaml.safe_dump(v, default_flow_style=True)}" for k, v in settings.items()],
                    )
                except UserError as exc:
                    raise UserError(
                        f"{source}: {grid.origin_of(row)}: {str(exc).removeprefix('--set ')}"
                    ) from None
                raw["name"], raw["seed"] = name, seed
                section = raw.get("sparsity", {})
                if not isinstance(section, dict):
                    raise UserError(f"{source}: base: sparsity: expected a mapping of settings")
                section = raw["sparsity"] = {**switch_method(section, method), "sparsity": sparsity}
                run = Run(name, method, sparsity, seed, raw, row=row)
                if method in sources:
                    needed, option = sources[method]
                    at = 0.0 if METHOD_OPTIONS[needed].keeps_every_weight else sparsity
                    run.depends_on = run_name(grid_name, needed, at, seed)
                    section[option] = str(runs_dir / run.depends_on / "train" / "final.pt")
                try:
                    run.cfg = _validated(raw, f"{source}: {name}", grid, row, settings)
                except UserError:
                    # A run may only validate once the run it starts from is done: checked at launch.
                    if run.depends_on is None or Path(section[sources[method][1]]).exists():
                        raise
                runs.append(run)
    return runs


def _validated(raw: dict[str, Any], where: str, grid: Grid, row: str, settings: dict[str, Any]) -> Pipeline:
    """The run's pipeline, or its one-line error. An error in a setting the grid itself holds (its
    inline base, or the method's overrides) quotes the cause; one in a base file's settings does
    not (see `quotes_base`)."""
    try:
        return parse_pipeline(raw, where, quote=True)
    except UserError as quoted:
        setting = str(quoted).removeprefix(f"{where}: ").partition(": ")[0]
        overridden = [key for key in settings if _overlaps(key, setting)]
        if overridden:
            raise UserError(f"{quoted} (from {grid.origin_of(row)}: {', '.join(overridden)})") from None
        if quotes_base(grid):
            raise
    return parse_pipeline(raw, where, quote=False)  # raises the error, quoting nothing


def _overlaps(key: str, setting: str) -> bool:
    """Whether the dotted setting `key` is, holds or lies within `setting`."""
    return key == setting or key.startswith(setting + ".") or setting.startswith(key + ".")


def _complete(run: Run, runs_dir: Path) -> Report | None:
    """The run's report, if every stage of the run is complete with its current settings."""
    folder = RunDir(runs_dir, run.name)
    return read_report(folder.report) if run.cfg is not None and folder.is_complete(run.cfg) else None


def _start_over_if_stale(run: Run, runs_dir: Path) -> bool:
    """Clear the run's folder if it holds training outputs made with other settings (the grid
    owns its run folders: they are redone, where `dsrpipe run` would refuse to mix them)."""
    folder = RunDir(runs_dir, run.name)
    with folder.lock():  # not while a `dsrpipe run` is at it
        if not any(folder.state(stage, run.cfg) == STALE for stage in training_stages(run.cfg)):
            return False
        folder.clear()
    return True


def _train_seconds(run: Run, runs_dir: Path) -> float | None:
    folder = RunDir(runs_dir, run.name)
    histories = [folder.history(s) for s in (training_stages(run.cfg) if run.cfg is not None else ["train"])]
    if not histories[0]:
        return None
    return sum(h.get("seconds", 0.0) for history in histories for h in history)


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _job_spec(run: Run, folder: Path) -> JobSpec:
    """`dsrpipe run` on the run's pipeline file, into <grid>/runs, its output to <grid>/logs."""
    pipeline_file = folder / "pipelines" / f"{run.name}.yaml"
    return JobSpec(
        run.name,
        "dsrpipe",
        ["run", str(pipeline_file), "--out", str(folder / "runs"), "--no-progress"],
        folder / "logs" / f"{run.name}.log",
    )


# -- running ----------------------------------------------------------------------------------
def run_grid(
    grid_path: str | Path,
    out: str | Path = "export",
    *,
    jobs: int = 1,
    nproc_per_job: int = 1,
    echo: Callable[[str], None] | None = None,
    cluster: ExecutorOptions | None = None,
) -> dict[str, Any]:
    """Run (or pick up) every run of the grid, then write results.csv, results.md and
    accuracy_vs_params.png; returns their paths and the runs. `nproc_per_job` > 1 runs each
    through torchrun as that many processes (one per GPU on CUDA). `cluster`: the executor
    (dsrpipe.executors) and each job's resources, over the grid's `cluster:` section; with
    dry_run, the sbatch script is returned (as `sbatch`) and nothing is run."""
    cluster = cluster or ExecutorOptions()
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if nproc_per_job < 1:
        raise UserError(f"--nproc-per-job must be at least 1, got {nproc_per_job}")
    grid_path, out = Path(grid_path), Path(out)
    grid, grid_name, base = load_grid(grid_path)
    settings = cluster_settings(grid, base, str(grid_path))
    folder = out / grid_name
    runs = plan_runs(grid, grid_name, base, folder / "runs", source=str(grid_path))
    # Made only once the grid is planned, and before any run is written: a bad engine, option or
    # address fails there, nothing submitted.
    executor_made = functools.partial(
        make_executor,
        cluster.executor,
        cluster.resources(nproc_per_job, cluster_resources(settings)),
        owner=f"dsrpipe-compare-{uuid.uuid4().hex[:12]}",
        folder=folder / "slurm",
        jobs=jobs,
        address=cluster.address,
        local=settings.local,
        tasks_per_node=settings.tasks_per_node,
        dry_run=cluster.dry_run,
    )
    if cluster.dry_run:
        return {"sbatch": executor_made().dry_run(_job_spec(runs[0], folder)), "runs": runs}
    command = _command_line(grid_path, out, jobs, nproc_per_job, cluster.executor)
    schedule = Schedule(grid, runs, folder, grid_path, command, echo or _to_stderr)
    folder.mkdir(parents=True, exist_ok=True)
    # For the whole compare: a second compare of the same grid into the same --out would start the
    # same runs and write the same results. Taken first: a second one is refused before it starts
    # or joins an engine.
    with files.holding_lock(
        folder / "compare.lock",
        lambda pid: (
            f"{folder} is in use by another dsrpipe compare (pid {pid}): wait for it to finish or stop it"
        ),
    ):
        executor = executor_made()
        try:
            executor.check_storage(folder / "runs")  # remote workers must write where the table is read
            schedule.run(executor, jobs, nproc_per_job)
        finally:
            executor.close()
        return {**schedule.results(), "runs": runs}


def _command_line(grid_path: Path, out: Path, jobs: int, nproc_per_job: int, executor: str) -> str:
    """The compare command, as results.md says what produced it."""
    return shlex.join(
        ["dsrpipe", "compare", str(grid_path), "--out", str(out), "--jobs", str(jobs)]
        + (["--nproc-per-job", str(nproc_per_job)] if nproc_per_job > 1 else [])
        + (["--executor", executor] if executor != "local" else [])
    )


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Schedule:
    """The planned runs of one grid, run by an executor, `jobs` at a time, in order: a run
    that another starts from (frozen ← dsr, prune ← dense) ends before that one starts."""

    def __init__(
        self,
        grid: Grid,
        runs: list[Run],
        folder: Path,
        grid_path: Path,
        command: str,
        echo: Callable[[str], None],
    ):
        self.grid, self.runs, self.folder, self.grid_path, self.echo = grid, runs, folder, grid_path, echo
        self.command = command  # the compare command, as results.md says what produced it
        self.runs_dir = folder / "runs"
        self.by_name = {r.name: r for r in runs}
        self.running: list[Run] = []
        self.done = 0

    def run(self, executor: Executor, jobs: int, nproc: int) -> None:
        """Every run not complete yet, to its end. Interrupted: local runs got the Ctrl-C too and
        are given time to save, then stopped; an engine's jobs are cancelled (they resume from
        their checkpoints when run again)."""
        self.executor, self.nproc = executor, nproc
        todo = self._pick_up_complete()
        on = "" if executor.name == "local" else " on " + executor.describe()
        self.echo(
            f"{self.folder.name}: {len(self.runs)} runs, {self.done} already complete, {len(todo)} to run "
            f"({jobs} at a time{on}) → {self.folder}"
        )
        try:
            while todo or self.running:
                self._start_ready(todo, jobs)
                time.sleep(0.1)
                self._collect_ended()
        finally:
            for run in self.running:
                executor.cancel(run.job_id)
            if self.running and executor.name != "local":
                self.echo(
                    f"cancelled {len(self.running)} {executor.name} job(s): "
                    + ", ".join(f"{r.name} ({r.job_id})" for r in self.running)
                )
            executor.shutdown()

    def _pick_up_complete(self) -> list[Run]:
        """Runs complete with their settings count as done; the others, to run."""
        for run in self.runs:  # in order: a frozen run after the DSR run it reads
            if run.depends_on and not self.by_name[run.depends_on].reused:
                continue  # its masks are (re)made now: let `dsrpipe run` check it against them
            report = _complete(run, self.runs_dir)
            if report is not None:
                _finish(run, self.runs_dir, report, reused=True)
        todo = [r for r in self.runs if r.status == "pending"]
        self.done = len(self.runs) - len(todo)
        return todo

    def _start_ready(self, todo: list[Run], jobs: int) -> None:
        """Start the runs whose source run (if any) has ended, while fewer than `jobs` run."""
        for run in list(todo):
            if len(self.running) >= jobs:
                break
            needed = self.by_name.get(run.depends_on) if run.depends_on else None
            if needed is not None and needed.status in ("pending", "running"):
                continue
            todo.remove(run)
            if needed is not None and needed.status == "crashed":
                run.status, run.message = "crashed", f"not run: {needed.name}, which it starts from, crashed"
            else:
                self._start(run)
            if run.status == "crashed":
                self.done += 1
                self.echo(f"[{self.done}/{len(self.runs)}] {run.name}: {run.message}")

    def _start(self, run: Run) -> None:
        try:
            if run.cfg is None:  # a frozen run whose masks now exist
                run.cfg = parse_pipeline(run.raw, f"{self.grid_path}: {run.name}", quotes_base(self.grid))
            if _start_over_if_stale(run, self.runs_dir):
                self.echo(
                    f"{run.name}: its outputs were made with other settings (an edited grid, another "
                    "dsrpipe version): starting it over"
                )
        except UserError as exc:
            run.status, run.message = "crashed", str(exc)
            return
        pipeline_file = self.folder / "pipelines" / f"{run.name}.yaml"
        text = yaml.safe_dump(run.raw, sort_keys=False)
        if not pipeline_file.exists() or pipeline_file.read_text() != text:
            files.write_text(pipeline_file, text)
        run.job_id = self.executor.submit(_job_spec(run, self.folder))
        if self.executor.name != "local":
            self.echo(f"{run.name}: submitted to {self.executor.name} as {run.job_id}")
        run.status, run.started = "running", time.perf_counter()
        self.running.append(run)

    def _collect_ended(self) -> None:
        """Record the runs whose jobs ended: their reports, or why they crashed."""
        for run in list(self.running):
            code = self.executor.poll(run.job_id)
            if code is None:
                continue
            self.running.remove(run)
            run.ended = time.perf_counter()
            # torchrun exits 1 whatever its ranks' codes: a failed validation (3) is told by its report
            report = _complete(run, self.runs_dir) if code in (0, 3) or self.nproc > 1 else None
            log_file = self.folder / "logs" / f"{run.name}.log"
            if report is not None:
                _finish(run, self.runs_dir, report)
            elif code == LOST:
                run.status, run.message = (
                    "crashed",
                    f"{self.executor.name} lost job {run.job_id} (see {log_file})",
                )
            else:
                run.status, run.message = "crashed", f"exit {code}: {_last_line(log_file)} (see {log_file})"
            self.done += 1
            self.echo(
                f"[{self.done}/{len(self.runs)}] {run.name}: {_summary(run)} ({run.ended - run.started:.0f} s)"
            )
            # A grid can take several sittings: its table grows with each run, not only at the end.
            write_results(self.folder, self.runs, command=self.command)

    def results(self) -> dict[str, Path]:
        """results.csv, results.md and the plot, written; the runs that crashed, said."""
        written = write_results(self.folder, self.runs, command=self.command)
        crashed = [r for r in self.runs if r.status == "crashed"]
        if crashed:
            self.echo(
                f"{self.folder.name}: {len(crashed)} of {len(self.runs)} runs crashed: "
                + ", ".join(r.name for r in crashed)
            )
        return written


def _finish(run: Run, runs_dir: Path, report: Report, reused: bool = False) -> None:
    run.report, run.reused = report, reused
    run.status = "ok" if report.passed else "validation-failed"
    run.message = report.failure or ""
    run.train_seconds = _train_seconds(run, runs_dir)


def _summary(run: Run) -> str:
    if run.report is None:
        return run.message
    return (
        f"{run.status}, ONNX top-1 {run.report.onnx_top1:.4f}, {run.report.nonzero_params:,} non-zero params"
    )
