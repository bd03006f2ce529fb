"""The pipeline YAML, validated once at the edge: everything past `load_pipeline` is typed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a run name is a folder name: no paths, no surprises


class DataConfig(Section):
    dataset: str = "digits"
    root: Path | None = None  # folder (or archive, for imagefolder); relative to the working directory
    download: bool = False
    image_size: int | None = Field(None, ge=4)
    augment: bool = True
    num_workers: int | None = Field(None, ge=0)
    cache_dir: Path | None = None
    max_train: int | None = Field(None, ge=1)  # train on a fixed random subset of this many images
    max_test: int | None = Field(None, ge=1)  # evaluate on a fixed random subset of this many images

    @model_validator(mode="after")
    def _known_dataset_with_its_files(self):
        from .data import KNOWN_DATASETS, dataset_needs_root

        if self.dataset not in KNOWN_DATASETS:
            raise ValueError(f"unknown dataset '{self.dataset}' (known: {', '.join(KNOWN_DATASETS)})")
        if dataset_needs_root(self.dataset):
            if self.root is None:
                raise ValueError(f"dataset '{self.dataset}' needs root: (where its files are)")
            if not self.root.exists() and not (self.download and self.dataset != "imagefolder"):
                raise ValueError(f"root does not exist: {self.root}")
        return self

    def load(self):
        """The (train, test) splits as configured."""
        from .data import load_data

        return load_data(self.dataset, root=self.root, download=self.download, image_size=self.image_size,
                         cache_dir=self.cache_dir, num_workers=self.num_workers, max_train=self.max_train,
                         max_test=self.max_test)


class ModelConfig(Section):
    name: str = "small-cnn"
    options: dict[str, Any] = {}  # passed to the model factory, e.g. {dropout: 0.3}

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from .models import is_known_model

        if not is_known_model(name):
            raise ValueError(f"unknown model '{name}' (see `dsrpipe models`)")
        return name


class SparsityConfig(Section):
    method: str = "dsr"
    sparsity: float = Field(0.9, ge=0.0, lt=1.0)
    dense_first: bool = True  # keep the first conv dense
    dense_last: bool = True  # keep the final classifier dense
    exclude: list[str] = []  # more dense layers, as fnmatch patterns on module names
    prune_target: int = Field(20_000, gt=0)  # N_p
    init_threshold: float = Field(0.001, gt=0)  # initial H
    tolerance: float = Field(0.1, ge=0, lt=1)  # δ
    rewire_periods: dict[int, int] = {0: 100}  # start epoch -> reallocation period (iterations)
    stop_rewire_epoch: int | None = Field(None, ge=0)
    scale_init: bool = False  # scale each sparse tensor's initial weights by 1/sqrt(density)
    zeta: float = Field(0.3, ge=0, le=1)  # set: fraction of each layer's active weights replaced per period
    rigl_alpha: float = Field(0.3, ge=0, le=1)  # rigl: initial drop fraction, cosine-decayed to 0 by the stop epoch (else the end)
    deepr_temperature: float = Field(1e-8, ge=0)  # deepr: noise temperature T (noise std sqrt(2·lr·T) per step)
    deepr_l1: float = Field(1e-5, ge=0)  # deepr: L1 strength α (each step moves weights lr·α toward 0)
    prune_begin_epoch: int = Field(0, ge=0)  # prune: epoch at which gradual pruning starts from dense
    prune_end_epoch: int | None = Field(None, ge=1)  # prune: epoch by which it reaches `sparsity`; None: 75% of training
    masks_from: Path | None = None  # frozen: a run's train/final.pt (relative to the working directory) whose masks are retrained from scratch

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from .sparse import METHODS

        if method not in METHODS:
            raise ValueError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
        return method

    @model_validator(mode="after")
    def _method_options(self):
        if self.method == "frozen" and self.masks_from is None:
            raise ValueError("method 'frozen' needs masks_from: the train/final.pt of the run whose masks to retrain")
        if self.prune_end_epoch is not None and self.prune_begin_epoch >= self.prune_end_epoch:
            raise ValueError("prune_begin_epoch must be before prune_end_epoch")
        return self

    @field_validator("rewire_periods")
    @classmethod
    def _periods_from_epoch_zero(cls, periods: dict[int, int]) -> dict[int, int]:
        if 0 not in periods:
            raise ValueError("needs an entry for epoch 0")
        if any(e < 0 or p < 1 for e, p in periods.items()):
            raise ValueError("epochs must be >= 0 and periods >= 1")
        return dict(sorted(periods.items()))


class OptimConfig(Section):
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    milestones: list[int] = []  # epochs at which the LR is multiplied by gamma
    gamma: float = Field(0.1, gt=0)
    compile: bool = False  # torch.compile the training step (CUDA: also as CUDA graphs); slower to start


class FinetuneConfig(OptimConfig):
    epochs: int = Field(0, ge=0)  # 0 skips the stage
    lr: float = Field(0.001, gt=0)


class ExportConfig(Section):
    opset: int = Field(18, ge=13)
    sparse_initializers: bool = True  # store pruned weights as ONNX sparse tensors: smaller files


class ValidateConfig(Section):
    min_top1: float | None = Field(None, ge=0, le=1)
    max_abs_diff: float | None = Field(None, gt=0)
    latency_runs: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)


class Pipeline(Section):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    name: str = Field(pattern=f"^{SAFE_NAME}$")
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    bf16: bool = False  # bf16 autocast, on CUDA only
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    train: OptimConfig = Field(default_factory=OptimConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # `validate` would shadow a pydantic method, hence the alias.
    validation: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")

    def fingerprint(self, *sections: str) -> str:
        """A hash of the settings a stage's outputs depend on, to tell stale outputs apart."""
        chosen = {s: getattr(self, s) for s in sections}
        text = json.dumps({s: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
                           for s, v in chosen.items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# Which settings each stage's outputs depend on (its own and everything upstream).
TRAIN_SETTINGS = ("seed", "bf16", "data", "model", "sparsity", "train")
FINETUNE_SETTINGS = TRAIN_SETTINGS + ("finetune",)
EXPORT_SETTINGS = FINETUNE_SETTINGS + ("export",)
VALIDATE_SETTINGS = EXPORT_SETTINGS + ("validation",)


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(where, what) of a validation error, for a one-line message: the dotted path of the first
    problem ("" at the top level) and what is wrong, with a count of any others."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return where, f"{message}{more}"


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's data, or a one-line UserError naming the file (and the line)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


def parse_pipeline(raw: Any, source: str = "pipeline") -> Pipeline:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of settings at the top level")
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as exc:
        where, what = first_error(exc)
        raise UserError(f"{source}: {where or '(top level)'}: {what}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.key=value` settings from the command line; values are read as YAML."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE (e.g. data.root=/data), got '{item}'")
        *parents, leaf = key.strip().split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{part}' is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot read value '{value}'") from None
    return raw


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    path = Path(path)
    raw = read_yaml(path, "pipeline")
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)  # a pipeline is named after its file unless it says
        apply_overrides(raw, list(overrides))
    return parse_pipeline(raw, str(path))


def _path_settings(section: BaseModel, prefix: str = "") -> list[tuple[str, Path]]:
    """Every path-typed setting that is set, as (dotted name, path): data.root, masks_from, ..."""
    found = []
    for name, value in section:
        if isinstance(value, BaseModel):
            found += _path_settings(value, f"{prefix}{name}.")
        elif isinstance(value, Path):
            found.append((f"{prefix}{name}", value))
    return found


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
                raise UserError(f"{where}: {path} is outside {' and '.join(map(str, allowed))}; "
                                "only paths inside them are allowed here")
