"""The pipeline YAML, validated once at the edge: everything past `load_pipeline` is typed.

Every value is bounded by what makes sense, so that no setting can make a run allocate, loop or
overflow absurdly later on; the YAML itself is read without aliases and with bounded size and
nesting (see `parse_yaml`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

MAX_YAML_BYTES = 2**20
MAX_YAML_DEPTH = 20
MAX_EPOCHS = 10_000
MAX_STEPS = 10**9  # iterations, and weights (prune_target)
MAX_BATCH = 4096
MAX_IMAGE_SIZE = 1024
MAX_IMAGES = 10**8
MAX_WORKERS = 64
MAX_SEED = 2**32 - 1  # a 32-bit seed: what every RNG's seeding takes
MAX_LATENCY_RUNS = 10_000
MIN_OPSET = 18  # the torch.export-based exporter writes opset 18 at least, whatever it is asked
MAX_LIST = 100  # milestones, rewire periods, exclude patterns
MAX_OPTIONS, MAX_OPTION_ITEMS, MAX_STRING = 32, 64, 256  # model.options


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a run name is a folder name: no paths, no surprises


def _no_nul(path: Path) -> Path:
    if "\0" in str(path):
        raise ValueError("a path cannot contain a NUL character")
    return path


FilePath = Annotated[Path, AfterValidator(_no_nul)]


def _plain_value(value: Any) -> bool:
    """A model option's value: a number, a short string, a boolean or null."""
    if isinstance(value, str):
        return len(value) <= MAX_STRING
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int):
        return abs(value) < 2**31
    return value is None


class DataConfig(Section):
    dataset: str = "digits"
    root: FilePath | None = None  # folder (or archive, for imagefolder); relative to the working directory
    download: bool = False
    image_size: int | None = Field(None, ge=4, le=MAX_IMAGE_SIZE)
    augment: bool = True
    num_workers: int | None = Field(None, ge=0, le=MAX_WORKERS)
    cache_dir: FilePath | None = None
    max_train: int | None = Field(None, ge=1, le=MAX_IMAGES)  # train on a fixed random subset of this many images
    max_test: int | None = Field(None, ge=1, le=MAX_IMAGES)  # evaluate on a fixed random subset of this many images

    @model_validator(mode="after")
    def _known_dataset_with_its_files(self):
        from .data import KNOWN_DATASETS, dataset_needs_root

        if self.dataset not in KNOWN_DATASETS:
            raise ValueError(f"unknown dataset '{self.dataset}' (known: {', '.join(KNOWN_DATASETS)})")
        if dataset_needs_root(self.dataset):
            if self.root is None:
                raise ValueError(f"dataset '{self.dataset}' needs root: (where its files are)")
            try:
                exists = self.root.exists()
            except OSError as exc:
                raise ValueError(f"root cannot be looked at: {exc.strerror}") from None
            if not exists and not (self.download and self.dataset != "imagefolder"):
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

    @field_validator("options")
    @classmethod
    def _plain_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        if len(options) > MAX_OPTIONS:
            raise ValueError(f"at most {MAX_OPTIONS} options")
        for key, value in options.items():
            values = value if isinstance(value, list) else [value]
            if len(key) > MAX_STRING or len(values) > MAX_OPTION_ITEMS or not all(map(_plain_value, values)):
                raise ValueError(f"'{key[:40]}': expected a number, a string, a boolean, or a list of at most "
                                 f"{MAX_OPTION_ITEMS} of those")
        return options

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
    exclude: list[str] = Field([], max_length=MAX_LIST)  # more dense layers, as fnmatch patterns on module names
    prune_target: int = Field(20_000, gt=0, le=MAX_STEPS)  # N_p
    init_threshold: float = Field(0.001, gt=0)  # initial H
    tolerance: float = Field(0.1, ge=0, lt=1)  # δ
    rewire_periods: dict[int, int] = Field({0: 100}, max_length=MAX_LIST)  # start epoch -> period (iterations)
    stop_rewire_epoch: int | None = Field(None, ge=0, le=MAX_EPOCHS)
    scale_init: bool = False  # scale each sparse tensor's initial weights by 1/sqrt(density)
    zeta: float = Field(0.3, ge=0, le=1)  # set: fraction of each layer's active weights replaced per period
    rigl_alpha: float = Field(0.3, ge=0, le=1)  # rigl: initial drop fraction, cosine-decayed to 0 by the stop epoch (else the end)
    deepr_temperature: float = Field(1e-8, ge=0)  # deepr: noise temperature T (noise std sqrt(2·lr·T) per step)
    deepr_l1: float = Field(1e-5, ge=0)  # deepr: L1 strength α (each step moves weights lr·α toward 0)
    prune_begin_epoch: int = Field(0, ge=0, le=MAX_EPOCHS)  # prune: epoch at which gradual pruning starts from dense
    prune_end_epoch: int | None = Field(None, ge=1, le=MAX_EPOCHS)  # prune: epoch by which it reaches `sparsity`; None: 75% of training
    masks_from: FilePath | None = None  # frozen: a run's train/final.pt (relative to the working directory) whose masks are retrained from scratch

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
        if any(not 0 <= e <= MAX_EPOCHS or not 1 <= p <= MAX_STEPS for e, p in periods.items()):
            raise ValueError(f"epochs must be in 0..{MAX_EPOCHS} and periods in 1..{MAX_STEPS}")
        return dict(sorted(periods.items()))


class OptimConfig(Section):
    epochs: int = Field(30, ge=0, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    milestones: list[int] = Field([], max_length=MAX_LIST)  # epochs at which the LR is multiplied by gamma
    gamma: float = Field(0.1, gt=0)
    compile: bool = False  # torch.compile the training step (CUDA: also as CUDA graphs); slower to start

    @model_validator(mode="after")
    def _milestones_within_epochs(self):
        m = self.milestones
        if m != sorted(set(m)) or (m and not 0 <= m[0] <= m[-1] <= self.epochs):
            raise ValueError(f"milestones must be increasing epochs from 0 to epochs ({self.epochs}), got {m}")
        return self


class FinetuneConfig(OptimConfig):
    epochs: int = Field(0, ge=0, le=MAX_EPOCHS)  # 0 skips the stage
    lr: float = Field(0.001, gt=0)


class ExportConfig(Section):
    opset: int = Field(18, ge=MIN_OPSET)
    sparse_initializers: bool = True  # store pruned weights as ONNX sparse tensors: smaller files

    @field_validator("opset")
    @classmethod
    def _known_to_onnx(cls, opset: int) -> int:
        from onnx.defs import onnx_opset_version  # only when set: importing onnx takes a while

        if opset > onnx_opset_version():
            raise ValueError(f"the installed onnx knows opsets up to {onnx_opset_version()}, not {opset}")
        return opset


class ValidateConfig(Section):
    min_top1: float | None = Field(None, ge=0, le=1)
    max_abs_diff: float | None = Field(None, gt=0)
    latency_runs: int = Field(200, ge=1, le=MAX_LATENCY_RUNS)
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)


class Pipeline(Section):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False, populate_by_name=True)

    name: str = Field(pattern=f"^{SAFE_NAME}$")
    seed: int = Field(0, ge=0, le=MAX_SEED)
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


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader without aliases (a few lines of `&a [*a, *a, ...]` expand to
    gigabytes once dumped or hashed) and with bounded nesting (deep nesting overflows the stack)."""

    depth = 0

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
        if self.depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(data: bytes | str, source: str) -> Any:
    """YAML (UTF-8 text, no aliases, nesting bounded) as plain data, or a one-line UserError
    naming `source` (and the line)."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise UserError(f"{source}:{where} not valid YAML ({problem})") from None
    except Exception as exc:  # what the constructors let through, e.g. a date that is no date
        raise UserError(f"{source}: not valid YAML ({type(exc).__name__}: {' '.join(str(exc).split())})") from None


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's data (see `parse_yaml`), or a one-line UserError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_YAML_BYTES:
        raise UserError(f"{path}: larger than {MAX_YAML_BYTES // 1024} KiB, too large for a {what}")
    return parse_yaml(data, str(path))


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
        node[leaf] = parse_yaml(value, f"--set {key}")
    return raw


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    path = Path(path)
    raw = read_yaml(path, "pipeline")
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)  # a pipeline is named after its file unless it says
        apply_overrides(raw, list(overrides))
    return parse_pipeline(raw, str(path))
