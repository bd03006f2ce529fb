"""A grid file, read and validated (the schema: docs/reproducing.md and dsrpipe.compare), and
the runs it names."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import (
    METHOD_OPTIONS,
    ClusterConfig,
    Pipeline,
    first_error,
    flat_settings,
    path_settings,
    read_yaml,
    section_settings,
)
from ..errors import UserError
from ..executors import Resources
from ..models.user_models import names_code
from ..names import SAFE_NAME, SAFE_NAME_LENGTH
from ..quantities import parse_size
from ..report import Report

MAX_RUNS = 10_000  # runs in one grid (rows × their sparsities × seeds), checked before any is planned
GRID_AXES = {"name", "seed", "sparsity.method", "sparsity.sparsity"}  # set per run by the grid


class Variant(BaseModel):
    """A row of `method` under a name of its own, with its own settings (and sparsities)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    sparsities: list[float] | None = Field(None, min_length=1, max_length=MAX_RUNS)
    settings: dict[str, Any] = {}

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHOD_OPTIONS:
            raise ValueError(f"unknown method '{method}' (known: {', '.join(METHOD_OPTIONS)})")
        return method

    @field_validator("sparsities")
    @classmethod
    def _valid_sparsities(cls, sparsities: list[float] | None) -> list[float] | None:
        return None if sparsities is None else _sparsities(sparsities)


def _sparsities(sparsities: list[float]) -> list[float]:
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity {s} is not in [0, 1)")
    return _unique(sparsities)


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=f"^{SAFE_NAME}$")
    base: dict[str, Any] | str
    methods: list[str] = Field(min_length=1, max_length=MAX_RUNS)
    sparsities: list[float] = Field(min_length=1, max_length=MAX_RUNS)
    seeds: list[int] = Field([0], min_length=1, max_length=MAX_RUNS)
    overrides: dict[str, dict[str, Any]] = {}
    variants: dict[str, Variant] = Field({}, max_length=MAX_RUNS)
    cluster: ClusterConfig | None = None  # what each job asks of a cluster (else the base's cluster:)

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, methods: list[str]) -> list[str]:
        return _unique(methods)

    @field_validator("sparsities")
    @classmethod
    def _valid_sparsities(cls, sparsities: list[float]) -> list[float]:
        return _sparsities(sparsities)

    @model_validator(mode="after")
    def _known_methods(self):
        for name in self.variants:
            if name in METHOD_OPTIONS or not re.fullmatch(SAFE_NAME, name):
                raise ValueError(f"variants: '{name}' must be a safe folder name and no method's name")
        for row in self.methods:
            if row not in METHOD_OPTIONS and row not in self.variants:
                raise ValueError(
                    f"unknown method '{row}' (known: {', '.join([*METHOD_OPTIONS, *self.variants])})"
                )
        for name, variant in self.variants.items():
            _grid_axes_untouched(f"variants.{name}.settings", variant.settings)
        return self

    def method_of(self, row: str) -> str:
        """The method a row of the grid runs (a variant's, or the row's own name)."""
        return self.variants[row].method if row in self.variants else row

    def settings_of(self, row: str) -> dict[str, Any]:
        """A row's settings over the base: a variant's, then the row's overrides."""
        variant = self.variants.get(row)
        return {**(variant.settings if variant else {}), **self.overrides.get(row, {})}

    def origin_of(self, row: str) -> str:
        """Where a row's settings come from, as an error names it."""
        return f"variants.{row}" if row in self.variants else f"overrides.{row}"

    def sparsities_of(self, row: str) -> list[float]:
        variant = self.variants.get(row)
        if variant is not None and variant.sparsities is not None:
            return variant.sparsities
        return [0.0] if METHOD_OPTIONS[self.method_of(row)].keeps_every_weight else self.sparsities

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        return _unique(seeds)

    @model_validator(mode="after")
    def _at_most_max_runs(self):
        # Row by row, as the plan has them: each row (a method, or a variant with sparsities of its
        # own) at its own sparsities (one for a method that keeps every weight), for every seed.
        cells = sum(len(self.sparsities_of(row)) for row in self.methods)
        runs = cells * len(self.seeds)
        if runs > MAX_RUNS:
            raise ValueError(
                f"{len(self.methods)} rows × their sparsities ({cells:,} row-sparsity pairs) × "
                f"{len(self.seeds)} seeds make {runs:,} runs, more than the {MAX_RUNS:,} a grid may have: "
                "split it"
            )
        return self

    @model_validator(mode="after")
    def _overrides_for_grid_methods(self):
        for method, settings in self.overrides.items():
            if method not in self.methods:
                raise ValueError(f"overrides: '{method}' is not one of the grid's methods")
            _grid_axes_untouched(f"overrides.{method}", settings)
        return self


def _grid_axes_untouched(where: str, settings: dict[str, Any]) -> None:
    for key, value in settings.items():
        for setting, _ in flat_settings(key.strip(), value):  # `sparsity: {sparsity: ...}` too
            if setting in GRID_AXES:
                raise ValueError(f"{where}: '{setting}' is set by the grid itself")


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
    row: str = ""  # the grid's row: its method's name, or a variant's (results group by it)
    # A run whose trained model this one starts from (frozen ← dsr, prune ← dense).
    depends_on: str | None = None
    status: str = "pending"  # pending, running, ok, validation-failed, crashed
    reused: bool = False
    report: Report | None = None
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
    if grid.name is None and not re.fullmatch(SAFE_NAME, name):
        raise UserError(f"{path}: the file name '{name}' is no safe folder name: set name: in the grid")
    # The grid's relative paths are written out from the same folder however the grid is named
    # (`grids/g.yaml` or `/home/me/grids/g.yaml`): they are settings, so another spelling would make
    # every finished run's fingerprint stale, and `compare` would start the runs over.
    folder = path.absolute().parent
    if isinstance(grid.base, str):
        base_path = (path.parent / grid.base) if not Path(grid.base).is_absolute() else Path(grid.base)
        # base: may name any file this process can read: its errors never quote it.
        base = read_yaml(base_path, "base pipeline", follow=False, quote=False)
        if not isinstance(base, dict):
            raise UserError(f"{base_path}: expected a mapping of settings at the top level")
        _refuse_code(base, base_path)
    else:
        base = _from_folder(grid.base, folder)
    grid.overrides = {
        method: {key: _resolved(key, value, folder) for key, value in settings.items()}
        for method, settings in grid.overrides.items()
    }
    for variant in grid.variants.values():
        variant.settings = {key: _resolved(key, value, folder) for key, value in variant.settings.items()}
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


def quotes_base(grid: Grid) -> bool:
    """Whether a run's errors may repeat its settings: only when the base is inline in the grid
    (a file the user named), not read from the file that `base:` names."""
    return not isinstance(grid.base, str)


def run_name(grid_name: str, method: str, sparsity: float, seed: int) -> str:
    """`<grid>-<method>-s<sparsity>-seed<k>`, which must be a safe run name (names.SAFE_NAME) too."""
    name = f"{grid_name}-{method}-s{sparsity:g}-seed{seed}"
    if not re.fullmatch(SAFE_NAME, name):
        raise UserError(
            f"the run name '{name}' is longer than a run name may be ({SAFE_NAME_LENGTH} characters): "
            "shorten the grid's name"
        )
    return name


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


def cluster_resources(cluster: ClusterConfig, nproc: int = 1) -> Resources:
    """What each job asks for by the grid's `cluster:` section (its time in minutes, its memory
    as written); the command line's options win over it (ExecutorOptions.resources)."""
    return Resources(
        cpus=cluster.cpus,
        gpus=cluster.gpus,
        nproc=nproc,
        memory=parse_size(cluster.memory) if cluster.memory is not None else None,
        time=cluster.time * 60 if cluster.time else None,
        partition=cluster.partition,
    )
