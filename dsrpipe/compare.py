"""`dsrpipe compare GRID.yaml`: one pipeline per method × sparsity × seed, and a table of the results.

The grid file:

    name: digits-grid              # optional; defaults to the grid file's name
    base: pipelines/quickstart.yaml   # a pipeline file (relative to this file), or the settings inline
    methods: [dsr, static, prune, dense]   # dense runs once per seed, whatever the sparsities
    sparsities: [0.9, 0.95]
    seeds: [0, 1, 2]
    overrides:                     # optional, per method: dotted settings, as with `--set`
      static: {train.lr: 0.05}     # a section given as a mapping is merged into the base's

Outputs, under `<out>/<grid>/`:
  runs/<grid>-<method>-s<sparsity>-seed<k>/   each run, as `dsrpipe run` lays it out (report.json, ...)
  pipelines/<run>.yaml                        the pipeline each run was given
  logs/<run>.log                              what each run printed
  results.csv, results.md, accuracy_vs_params.png

Each run is its own `dsrpipe run` process, so a crash stays in its row. A complete run (every
stage current with its settings) is not started again; an interrupted one resumes. `prune`
runs start from the dense run of their seed (trained first, added when the grid lacks it) and
`frozen` runs from the DSR run of their sparsity and seed.
"""

from __future__ import annotations

import copy
import csv
import io
import re
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import __version__, files
from .config import (
    METHOD_OPTIONS,
    ClusterConfig,
    Pipeline,
    apply_overrides,
    first_error,
    flat_settings,
    parse_pipeline,
    path_settings,
    read_yaml,
    section_settings,
    switch_method,
)
from .errors import UserError
from .executors import LOST, Executor, JobSpec, Resources, make_executor
from .models.user_models import names_code
from .plots import write_accuracy_vs_params
from .quantities import parse_size
from .rundir import STALE, RunDir, read_report, training_stages

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$"
MAX_RUNS = 10_000  # runs in one grid (methods × sparsities × seeds), checked before any is planned
GRID_AXES = {"name", "seed", "sparsity.method", "sparsity.sparsity"}  # set per run by the grid
CSV_COLUMNS = [
    "method",
    "sparsity",
    "seed",
    "nonzero_params",
    "total_params",
    "torch_top1",
    "onnx_top1",
    "train_seconds",
    "mac_images",
    "peak_rss_mib",
    "epochs",
    "status",
    "measured_sparsity",
    "top1_agreement",
    "latency_p50_ms",
    "onnx_bytes",
    "run",
    "message",
]


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=NAME_PATTERN)
    base: dict[str, Any] | str
    methods: list[str] = Field(min_length=1, max_length=MAX_RUNS)
    sparsities: list[float] = Field(min_length=1, max_length=MAX_RUNS)
    seeds: list[int] = Field([0], min_length=1, max_length=MAX_RUNS)
    overrides: dict[str, dict[str, Any]] = {}
    cluster: ClusterConfig | None = None  # what each job asks of a cluster (else the base's cluster:)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        for method in methods:
            if method not in METHOD_OPTIONS:
                raise ValueError(f"unknown method '{method}' (known: {', '.join(METHOD_OPTIONS)})")
        return _unique(methods)

    @field_validator("sparsities")
    @classmethod
    def _valid_sparsities(cls, sparsities: list[float]) -> list[float]:
        for s in sparsities:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity {s} is not in [0, 1)")
        return _unique(sparsities)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        return _unique(seeds)

    @model_validator(mode="after")
    def _at_most_max_runs(self):
        runs = len(self.methods) * len(self.sparsities) * len(self.seeds)
        if runs > MAX_RUNS:
            raise ValueError(
                f"{len(self.methods)} methods × {len(self.sparsities)} sparsities × {len(self.seeds)} seeds "
                f"make {runs:,} runs, more than the {MAX_RUNS:,} a grid may have: split it"
            )
        return self

    @model_validator(mode="after")
    def _overrides_for_grid_methods(self):
        for method, settings in self.overrides.items():
            if method not in self.methods:
                raise ValueError(f"overrides: '{method}' is not one of the grid's methods")
            for key, value in settings.items():
                for setting, _ in flat_settings(key.strip(), value):  # `sparsity: {sparsity: ...}` too
                    if setting in GRID_AXES:
                        raise ValueError(f"overrides.{method}: '{setting}' is set by the grid itself")
        return self


def _unique(values: list) -> list:
    """`values`, unless one is listed twice (one pass, with a set: grids may be long)."""
    seen = set()
    for value in values:
        if value in seen:
            raise ValueError(f"'{value}' is listed twice")
        seen.add(value)
    return values


@dataclass
class Run:
    name: str
    method: str
    sparsity: float
    seed: int
    raw: dict[str, Any]
    cfg: Pipeline | None = None
    # A run whose trained model this one starts from (frozen ← dsr, prune ← dense).
    depends_on: str | None = None
    status: str = "pending"  # pending, running, ok, validation-failed, crashed
    reused: bool = False
    report: dict[str, Any] | None = None
    train_seconds: float | None = None
    message: str = ""
    started: float = 0.0
    ended: float = 0.0
    job_id: str | None = None  # the executor's id of its job, while it runs


# -- reading the grid -------------------------------------------------------------------------
def load_grid(path: str | Path) -> tuple[Grid, str, dict[str, Any]]:
    """The validated grid, its name and the base pipeline's raw settings."""
    path = Path(path)
    # Neither file is followed through a final symbolic link, nor waited on (a FIFO): see files.open_regular.
    raw = read_yaml(path, "grid", follow=False)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with base, methods, sparsities and seeds")
    try:
        grid = Grid.model_validate(raw)
    except ValidationError as exc:
        where, what = first_error(exc)
        raise UserError(f"{path}: {where + ': ' if where else ''}{what}") from None
    name = grid.name or path.stem
    if grid.name is None and not re.match(NAME_PATTERN, name):
        raise UserError(f"{path}: the file name '{name}' is no safe folder name: set name: in the grid")
    if isinstance(grid.base, str):
        base_path = (path.parent / grid.base) if not Path(grid.base).is_absolute() else Path(grid.base)
        # base: may name any file this process can read: its errors never quote it.
        base = read_yaml(base_path, "base pipeline", follow=False, quote=False)
        if not isinstance(base, dict):
            raise UserError(f"{base_path}: expected a mapping of settings at the top level")
        _refuse_code(base, base_path)
    else:
        base = _from_folder(grid.base, path.parent)
    grid.overrides = {
        method: {key: _resolved(key, value, path.parent) for key, value in settings.items()}
        for method, settings in grid.overrides.items()
    }
    return grid, name, base


def _refuse_code(base: dict[str, Any], base_path: Path) -> None:
    """The file that `base:` names may be anyone's (its errors are never quoted): a model it names
    as `module:function` would import and run their code. The grid itself may name one."""
    model = base.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str) and names_code(model["name"]):
        raise UserError(
            f"{base_path}: model.name: a base: file may not name code (module:function); name the "
            "model in the grid itself (an inline base, or overrides) (docs/security.md)"
        )


def _resolved(key: str, value: Any, folder: Path) -> Any:
    """A relative path that the grid file holds, taken from the grid's folder (as `base:` is),
    within a section given whole too. A path from the home folder (`~/images`) is left as it is:
    it is expanded where it is used."""
    if isinstance(value, dict) and key in section_settings():
        return {sub: _resolved(f"{key}.{sub}", sub_value, folder) for sub, sub_value in value.items()}
    if key in path_settings() and isinstance(value, str) and value and not value.startswith("~"):
        return value if Path(value).is_absolute() else str(folder / value)
    return value


def _from_folder(base: dict[str, Any], folder: Path) -> dict[str, Any]:
    """An inline base with its relative paths taken from the grid's folder."""
    return {key: _resolved(key, copy.deepcopy(value), folder) for key, value in base.items()}


def _quotes_base(grid: Grid) -> bool:
    """Whether a run's errors may repeat its settings: only when the base is inline in the grid
    (a file the user named), not read from the file that `base:` names."""
    return not isinstance(grid.base, str)


def run_name(grid_name: str, method: str, sparsity: float, seed: int) -> str:
    return f"{grid_name}-{method}-s{sparsity:g}-seed{seed}"


def plan_runs(
    grid: Grid, grid_name: str, base: dict[str, Any], runs_dir: Path, source: str = "grid"
) -> list[Run]:
    """Every run's pipeline, validated before any starts.

    Runs that start from another run come after it: `frozen` retrains the final masks of the DSR
    run with the same sparsity and seed (when the grid has dsr), `prune` prunes the final weights
    of the dense run with the same seed (a grid with prune and no dense gets the dense runs).
    `dense` ignores sparsity, so it runs once per seed (as sparsity 0), not once per sparsity.
    Each run gets the base's sparsity options that its method takes (see config.switch_method)."""
    wire_frozen = "frozen" in grid.methods and "dsr" in grid.methods
    from_dense = {"prune", "prune-channels"} & set(grid.methods)
    methods = grid.methods + (["dense"] if from_dense and "dense" not in grid.methods else [])
    sources = {"frozen": ("dsr", "masks_from")} if wire_frozen else {}
    sources["prune"] = sources["prune-channels"] = ("dense", "prune_from")
    methods = sorted(methods, key=lambda m: m in sources)  # stable: dependants last
    runs = []
    for method in methods:
        for sparsity in [0.0] if method in ("dense", "prune-channels") else grid.sparsities:
            for seed in grid.seeds:
                name = run_name(grid_name, method, sparsity, seed)
                raw = copy.deepcopy(base)
                settings = grid.overrides.get(method, {})
                try:
                    apply_overrides(
                        raw,
                        [f"{k}={yaml.safe_dump(v, default_flow_style=True)}" for k, v in settings.items()],
                    )
                except UserError as exc:
                    raise UserError(
                        f"{source}: overrides.{method}: {str(exc).removeprefix('--set ')}"
                    ) from None
                raw["name"], raw["seed"] = name, seed
                section = raw.get("sparsity", {})
                if not isinstance(section, dict):
                    raise UserError(f"{source}: base: sparsity: expected a mapping of settings")
                section = raw["sparsity"] = {**switch_method(section, method), "sparsity": sparsity}
                run = Run(name, method, sparsity, seed, raw)
                if method in sources:
                    needed, option = sources[method]
                    run.depends_on = run_name(grid_name, needed, 0.0 if needed == "dense" else sparsity, seed)
                    section[option] = str(runs_dir / run.depends_on / "train" / "final.pt")
                try:
                    run.cfg = _validated(raw, f"{source}: {name}", grid, method, settings)
                except UserError:
                    # A run may only validate once the run it starts from is done: checked at launch.
                    if run.depends_on is None or Path(section[sources[method][1]]).exists():
                        raise
                runs.append(run)
    return runs


def _validated(
    raw: dict[str, Any], where: str, grid: Grid, method: str, settings: dict[str, Any]
) -> Pipeline:
    """The run's pipeline, or its one-line error. An error in a setting the grid itself holds (its
    inline base, or the method's overrides) quotes the cause; one in a base file's settings does
    not (see `_quotes_base`)."""
    try:
        return parse_pipeline(raw, where, quote=True)
    except UserError as quoted:
        setting = str(quoted).removeprefix(f"{where}: ").partition(": ")[0]
        overridden = [key for key in settings if _overlaps(key, setting)]
        if overridden:
            raise UserError(f"{quoted} (from overrides.{method}: {', '.join(overridden)})") from None
        if _quotes_base(grid):
            raise
    return parse_pipeline(raw, where, quote=False)  # raises the error, quoting nothing


def _overlaps(key: str, setting: str) -> bool:
    """Whether the dotted setting `key` is, holds or lies within `setting`."""
    return key == setting or key.startswith(setting + ".") or setting.startswith(key + ".")


# -- running ----------------------------------------------------------------------------------
def _complete(run: Run, runs_dir: Path) -> dict[str, Any] | None:
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


@dataclass
class ClusterOptions:
    """--executor and the resources each job asks for; None: from the grid's `cluster:`."""

    executor: str = "local"
    address: str | None = None
    gpus: int | None = None
    cpus: int | None = None
    memory: int | None = None  # bytes
    time: float | None = None  # seconds
    partition: str | None = None
    dry_run: bool = False


def cluster_settings(grid: Grid, base: dict[str, Any], source: str) -> ClusterConfig:
    """The grid's `cluster:` section, else its base pipeline's (validated as the rest is)."""
    if grid.cluster is not None:
        return grid.cluster
    raw = base.get("cluster", {})
    try:
        return ClusterConfig.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        where, what = first_error(exc)
        raise UserError(f"{source}: base: cluster{'.' + where if where else ''}: {what}") from None


def _resources(cluster: ClusterConfig, opts: ClusterOptions, nproc: int) -> Resources:
    memory = opts.memory
    if memory is None and cluster.memory is not None:
        memory = parse_size(cluster.memory)
    return Resources(
        cpus=cluster.cpus if opts.cpus is None else opts.cpus,
        gpus=cluster.gpus if opts.gpus is None else opts.gpus,
        nproc=nproc,
        memory=memory,
        time=opts.time if opts.time is not None else (cluster.time * 60 if cluster.time else None),
        partition=opts.partition or cluster.partition,
    )


def run_grid(
    grid_path: str | Path,
    out: str | Path = "export",
    *,
    jobs: int = 1,
    nproc_per_job: int = 1,
    echo: Callable[[str], None] | None = None,
    cluster: ClusterOptions | None = None,
) -> dict[str, Any]:
    """Run (or pick up) every run of the grid, then write results.csv, results.md and
    accuracy_vs_params.png; returns their paths and the runs. `nproc_per_job` > 1 runs each
    through torchrun as that many processes (one per GPU on CUDA). `cluster`: the executor
    (dsrpipe.executors) and each job's resources; with dry_run, the sbatch script is returned
    (as `sbatch`) and nothing is run."""
    cluster = cluster or ClusterOptions()
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if nproc_per_job < 1:
        raise UserError(f"--nproc-per-job must be at least 1, got {nproc_per_job}")
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    grid_path, out = Path(grid_path), Path(out)
    command = shlex.join(
        ["dsrpipe", "compare", str(grid_path), "--out", str(out), "--jobs", str(jobs)]
        + (["--nproc-per-job", str(nproc_per_job)] if nproc_per_job > 1 else [])
        + (["--executor", cluster.executor] if cluster.executor != "local" else [])
    )
    grid, grid_name, base = load_grid(grid_path)
    settings = cluster_settings(grid, base, str(grid_path))
    resources = _resources(settings, cluster, nproc_per_job)
    folder = out / grid_name
    runs_dir = folder / "runs"
    runs = plan_runs(grid, grid_name, base, runs_dir, source=str(grid_path))
    by_name = {r.name: r for r in runs}

    def executor_made() -> Executor:
        # Before any run is written: a bad engine, option or address fails here, nothing submitted.
        return make_executor(
            cluster.executor,
            resources,
            owner=f"dsrpipe-compare-{uuid.uuid4().hex[:12]}",
            folder=folder / "slurm",
            jobs=jobs,
            address=cluster.address,
            local=settings.local,
            tasks_per_node=settings.tasks_per_node,
            dry_run=cluster.dry_run,
        )

    if cluster.dry_run:
        spec = _job_spec(runs[0], folder, runs_dir)
        return {"sbatch": executor_made().dry_run(spec), "runs": runs}
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
            executor.check_storage(runs_dir)  # remote workers must write where the table is read
            return _run_planned(
                grid,
                runs,
                by_name,
                folder,
                grid_path,
                grid_name,
                command,
                jobs,
                nproc_per_job,
                echo,
                executor,
            )
        finally:
            executor.close()


def _job_spec(run: Run, folder: Path, runs_dir: Path) -> JobSpec:
    pipeline_file = folder / "pipelines" / f"{run.name}.yaml"
    return JobSpec(
        run.name,
        "dsrpipe",
        ["run", str(pipeline_file), "--out", str(runs_dir), "--no-progress"],
        folder / "logs" / f"{run.name}.log",
    )


def _run_planned(
    grid, runs, by_name, folder, grid_path, grid_name, command, jobs, nproc_per_job, echo, executor: Executor
):
    """run_grid's work once the grid is planned and its folder locked."""
    runs_dir = folder / "runs"

    for run in runs:  # in order: a frozen run after the DSR run it reads
        if run.depends_on and not by_name[run.depends_on].reused:
            continue  # its masks are (re)made now: let `dsrpipe run` check it against them
        report = _complete(run, runs_dir)
        if report is not None:
            _finish(run, runs_dir, report, reused=True)
    todo = [r for r in runs if r.status == "pending"]
    done = len(runs) - len(todo)
    echo(
        f"{grid_name}: {len(runs)} runs, {done} already complete, {len(todo)} to run "
        f"({jobs} at a time{'' if executor.name == 'local' else ' on ' + executor.describe()}) → {folder}"
    )

    running: list[Run] = []

    def start(run: Run) -> None:
        try:
            if run.cfg is None:  # a frozen run whose masks now exist
                run.cfg = parse_pipeline(run.raw, f"{grid_path}: {run.name}", _quotes_base(grid))
            if _start_over_if_stale(run, runs_dir):
                echo(
                    f"{run.name}: its outputs were made with other settings (an edited grid, another "
                    "dsrpipe version): starting it over"
                )
        except UserError as exc:
            run.status, run.message = "crashed", str(exc)
            return
        pipeline_file = folder / "pipelines" / f"{run.name}.yaml"
        text = yaml.safe_dump(run.raw, sort_keys=False)
        if not pipeline_file.exists() or pipeline_file.read_text() != text:
            files.write_text(pipeline_file, text)
        run.job_id = executor.submit(_job_spec(run, folder, runs_dir))
        if executor.name != "local":
            echo(f"{run.name}: submitted to {executor.name} as {run.job_id}")
        run.status, run.started = "running", time.perf_counter()
        running.append(run)

    try:
        while todo or running:
            for run in list(todo):
                if len(running) >= jobs:
                    break
                needed = by_name.get(run.depends_on) if run.depends_on else None
                if needed is not None and needed.status in ("pending", "running"):
                    continue
                todo.remove(run)
                if needed is not None and needed.status == "crashed":
                    run.status, run.message = (
                        "crashed",
                        f"not run: {needed.name}, which it starts from, crashed",
                    )
                else:
                    start(run)
                if run.status == "crashed":
                    done += 1
                    echo(f"[{done}/{len(runs)}] {run.name}: {run.message}")
            time.sleep(0.1)
            for run in list(running):
                code = executor.poll(run.job_id)
                if code is None:
                    continue
                running.remove(run)
                run.ended = time.perf_counter()
                # torchrun exits 1 whatever its ranks' codes: a failed validation (3) is told by its report
                report = _complete(run, runs_dir) if code in (0, 3) or nproc_per_job > 1 else None
                log_file = folder / "logs" / f"{run.name}.log"
                if report is not None:
                    _finish(run, runs_dir, report)
                elif code == LOST:
                    run.status, run.message = (
                        "crashed",
                        f"{executor.name} lost job {run.job_id} (see {log_file})",
                    )
                else:
                    run.status, run.message = (
                        "crashed",
                        f"exit {code}: {_last_line(log_file)} (see {log_file})",
                    )
                done += 1
                echo(f"[{done}/{len(runs)}] {run.name}: {_summary(run)} ({run.ended - run.started:.0f} s)")
    finally:
        # Interrupted: local runs got the Ctrl-C too and are given time to save, then stopped;
        # an engine's jobs are cancelled (they resume from their checkpoints when run again).
        for run in running:
            executor.cancel(run.job_id)
        if running and executor.name != "local":
            echo(
                f"cancelled {len(running)} {executor.name} job(s): "
                + ", ".join(f"{r.name} ({r.job_id})" for r in running)
            )
        executor.shutdown()

    result = write_results(folder, runs, command=command)
    crashed = [r for r in runs if r.status == "crashed"]
    if crashed:
        echo(
            f"{grid_name}: {len(crashed)} of {len(runs)} runs crashed: " + ", ".join(r.name for r in crashed)
        )
    return {**result, "runs": runs}


def _finish(run: Run, runs_dir: Path, report: dict[str, Any], reused: bool = False) -> None:
    run.report, run.reused = report, reused
    run.status = "ok" if report.get("passed", True) else "validation-failed"
    run.message = report.get("failure") or ""
    run.train_seconds = _train_seconds(run, runs_dir)


def _summary(run: Run) -> str:
    if run.report is None:
        return run.message
    return f"{run.status}, ONNX top-1 {run.report['onnx_top1']:.4f}, {run.report['nonzero_params']:,} non-zero params"


# -- results ----------------------------------------------------------------------------------
def total_epochs(run: Run, by_name: dict[str, Run]) -> int | None:
    """Every epoch of training behind the run: its own training and fine-tuning, and those of the
    run it starts from (prune and prune-channels start from a trained dense model)."""
    if run.report is None:
        return None
    own = run.report.get("train_epochs", 0) + run.report.get("finetune_epochs", 0)
    if run.depends_on is None or run.method == "frozen":  # frozen's source is another row's cost
        return own
    source = by_name.get(run.depends_on)
    before = total_epochs(source, by_name) if source is not None else None
    return None if before is None else own + before


def _row(run: Run, epochs: int | None = None) -> dict[str, Any]:
    r = run.report or {}
    latency = r.get("latency_ms") or {}
    training = r.get("training") or {}
    return {
        "method": run.method,
        "sparsity": run.sparsity,
        "seed": run.seed,
        "nonzero_params": r.get("nonzero_params"),
        "total_params": r.get("total_params"),
        "torch_top1": r.get("torch_top1"),
        "onnx_top1": r.get("onnx_top1"),
        "train_seconds": None if run.train_seconds is None else round(run.train_seconds, 3),
        "mac_images": training.get("mac_images"),
        "peak_rss_mib": round(training["peak_rss_bytes"] / 2**20, 1)
        if training.get("peak_rss_bytes")
        else None,
        "epochs": epochs,
        "status": run.status,
        "measured_sparsity": r.get("sparsity"),
        "top1_agreement": r.get("top1_agreement"),
        "latency_p50_ms": latency.get("p50"),
        "onnx_bytes": r.get("onnx_bytes"),
        "run": run.name,
        "message": run.message,
    }


def group_results(runs: list[Run]) -> list[dict[str, Any]]:
    """One entry per method × sparsity, over the runs that produced a report."""
    by_name = {r.name: r for r in runs}
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.method, run.sparsity), []).append(run)
    entries = []
    for (method, sparsity), members in groups.items():
        measured = [r for r in members if r.report is not None]
        top1 = [r.report["onnx_top1"] for r in measured]
        seconds = [r.train_seconds for r in measured if r.train_seconds is not None]
        costs = [(r.report.get("training") or {}) for r in measured]
        mac_images = [c["mac_images"] for c in costs if c.get("mac_images")]
        rss = [c["peak_rss_bytes"] for c in costs if c.get("peak_rss_bytes")]
        epochs = [e for r in measured if (e := total_epochs(r, by_name)) is not None]
        entries.append(
            {
                "method": method,
                "sparsity": sparsity,
                "runs": len(members),
                "n": len(measured),
                "crashed": sum(r.status == "crashed" for r in members),
                "below_threshold": sum(r.status == "validation-failed" for r in members),
                "params": statistics.mean(r.report["nonzero_params"] for r in measured) if measured else None,
                "total_params": statistics.mean(r.report["total_params"] for r in measured)
                if measured
                else None,
                "top1_mean": statistics.mean(top1) if top1 else None,
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
                "seconds_mean": statistics.mean(seconds) if seconds else None,
                "mac_images_mean": statistics.mean(mac_images) if mac_images else None,
                "peak_rss_mean": statistics.mean(rss) if rss else None,
                "epochs": max(epochs) if epochs else None,
            }
        )
    return entries


def write_results(folder: Path, runs: list[Run], *, command: str) -> dict[str, Path]:
    folder = Path(folder)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    by_name = {r.name: r for r in runs}
    for run in runs:
        row = _row(run, total_epochs(run, by_name))
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    paths = {
        "csv": folder / "results.csv",
        "md": folder / "results.md",
        "plot": folder / "accuracy_vs_params.png",
    }
    files.write_text(paths["csv"], buffer.getvalue())
    groups = group_results(runs)
    write_accuracy_vs_params(paths["plot"], groups, title=f"{folder.name}: top-1 against non-zero parameters")
    files.write_text(paths["md"], _markdown(folder.name, runs, groups, command))
    return paths


def _markdown(grid_name: str, runs: list[Run], groups: list[dict[str, Any]], command: str) -> str:
    cfg = next((r.cfg for r in runs if r.cfg is not None), None)
    lines = [f"# {grid_name}: {len(runs)} runs", ""]
    if cfg is not None:
        tune = f" + {cfg.finetune.epochs} fine-tuning" if cfg.finetune.epochs else ""
        lines += [
            f"{cfg.model.name} on {cfg.data.dataset}, {cfg.train.epochs} training{tune} epochs per run "
            f"(before per-method overrides).",
            "",
        ]
    lines += [
        "Top-1: the exported ONNX model on the test split, mean ± sample standard deviation over seeds. "
        "Params: non-zero parameters of the whole model (dense layers included). Train time: seconds "
        "of training and fine-tuning epochs per run, mean, and against dense where the grid has it. "
        "MACs × images: forward multiply-accumulates of the model as it was at each step, summed over the "
        "images trained on (a model that shrinks while it trains costs less). Peak RSS: the run's process. "
        "Epochs: all the training behind a run, the dense run it starts from included (prune, prune-channels).",
        "",
        "| method | sparsity | params (non-zero) | top-1 (%) | train time (s) | vs dense | MACs × images "
        "| peak RSS (MiB) | epochs | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    dense = next((g["seconds_mean"] for g in groups if g["method"] == "dense" and g["seconds_mean"]), None)
    for g in groups:
        params = "n/a" if g["params"] is None else f"{round(g['params']):,}"
        if g["top1_mean"] is None:
            top1 = "n/a"
        elif g["top1_std"] is None:
            top1 = f"{100 * g['top1_mean']:.2f}"
        else:
            top1 = f"{100 * g['top1_mean']:.2f} ± {100 * g['top1_std']:.2f}"
        seconds = "n/a" if g["seconds_mean"] is None else f"{g['seconds_mean']:.1f}"
        count = str(g["n"]) if g["n"] == g["runs"] else f"{g['n']} of {g['runs']}"
        notes = [f"{g['crashed']} crashed"] * bool(g["crashed"]) + [
            f"{g['below_threshold']} below threshold"
        ] * bool(g["below_threshold"])
        if notes:
            count += f" ({', '.join(notes)})"
        epochs = "n/a" if g["epochs"] is None else str(g["epochs"])
        ratio = f"{g['seconds_mean'] / dense:.2f}×" if dense and g["seconds_mean"] else "n/a"
        macs = "n/a" if g["mac_images_mean"] is None else f"{g['mac_images_mean']:.3g}"
        rss = "n/a" if g["peak_rss_mean"] is None else f"{g['peak_rss_mean'] / 2**20:,.0f}"
        lines.append(
            f"| {g['method']} | {g['sparsity']:g} | {params} | {top1} | {seconds} | {ratio} | {macs} | {rss} "
            f"| {epochs} | {count} |"
        )
    lines += ["", "![Top-1 against non-zero parameters](accuracy_vs_params.png)", ""]
    failed = [r for r in runs if r.status in ("crashed", "validation-failed")]
    if failed:
        lines += ["## Runs that failed", ""]
        lines += [f"- `{r.name}`: {r.status}: {r.message}" for r in failed]
        lines.append("")
    lines += [
        "Per-run numbers: `results.csv`; each run's report: `runs/<run>/report.md`.",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S %z')} (dsrpipe {__version__}).",
        "",
    ]
    return "\n".join(lines)
