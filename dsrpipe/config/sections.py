"""The pipeline's sections and `Pipeline` itself: what a run is, described, never built."""

from __future__ import annotations

import math
from typing import Any, Literal

from onnx.defs import onnx_opset_version
from pydantic import ConfigDict, Field, field_validator, model_validator

from ..catalog import KNOWN_DATASETS, dataset_needs_root
from ..contract import MAX_IMAGE_SIZE
from ..models import MissingExtra, is_known_model
from ..names import SAFE_NAME, SLURM_PARTITION_RULE, is_slurm_partition
from .methods import DEFAULT, MethodOptions, SparsityOptions, parse_method_options
from .schema import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_FACTOR,
    MAX_IMAGES,
    MAX_LATENCY_RUNS,
    MAX_LIST,
    MAX_OPTION_ITEMS,
    MAX_OPTIONS,
    MAX_SEED,
    MAX_STRING,
    MAX_WORKERS,
    MIN_OPSET,
    FilePath,
    Section,
)


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
    max_train: int | None = Field(
        None, ge=1, le=MAX_IMAGES
    )  # train on a fixed random subset of this many images
    max_test: int | None = Field(
        None, ge=1, le=MAX_IMAGES
    )  # evaluate on a fixed random subset of this many images

    @model_validator(mode="after")
    def _known_dataset_with_its_files(self):
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
                raise ValueError(
                    f"'{key[:40]}': expected a number, a string, a boolean, or a list of at most "
                    f"{MAX_OPTION_ITEMS} of those"
                )
        return options

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        try:
            known = is_known_model(name)
        except MissingExtra as missing:
            raise ValueError(str(missing)) from None
        if not known:
            raise ValueError(f"unknown model '{name}' (see `dsrpipe models`)")
        return name


class OptimConfig(Section):
    epochs: int = Field(30, ge=0, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    lr: float = Field(0.1, gt=0, le=MAX_FACTOR)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=MAX_FACTOR)
    milestones: list[int] = Field([], max_length=MAX_LIST)  # epochs at which the LR is multiplied by gamma
    gamma: float = Field(0.1, gt=0, le=MAX_FACTOR)
    compile: bool = False  # torch.compile the training step (CUDA: also as CUDA graphs); slower to start

    @model_validator(mode="after")
    def _increasing_milestones(self):
        m = self.milestones
        if m != sorted(set(m)) or (m and m[0] < 0):
            raise ValueError(f"milestones must be increasing epochs from 0, got {m}")
        return self

    def unreached_milestones(self) -> list[int]:
        """Milestones at or beyond `epochs`, which the LR schedule never reaches: a shorter run
        (`--set train.epochs=3`) of a pipeline made for a long one."""
        return [m for m in self.milestones if m >= self.epochs]


class FinetuneConfig(OptimConfig):
    epochs: int = Field(0, ge=0, le=MAX_EPOCHS)  # 0 skips the stage
    lr: float = Field(0.001, gt=0, le=MAX_FACTOR)


class ExportConfig(Section):
    opset: int = Field(18, ge=MIN_OPSET)
    shrink: bool = True  # remove channels whose filters are all zero: a smaller, faster graph, same logits
    # How pruned weights are stored (dsrpipe.deploy.encoding): compact is the smallest, dense the plainest.
    encoding: Literal["dense", "coo", "compact"] = "compact"
    # int8: model.onnx is the int8 QDQ model, model.fp32.onnx the float32 one (dsrpipe.deploy.quantize).
    quantize: Literal["none", "int8"] = "none"
    calibration_images: int = Field(300, ge=1, le=MAX_IMAGES)  # training images that calibrate int8
    # int8 weights: portable (7 bits) never saturates int16 on any x86-64 CPU; full (8 bits) is a bit
    # more precise but may saturate on CPUs without VNNI (docs/int8.md).
    int8_range: Literal["portable", "full"] = "portable"

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "sparse_initializers" in raw:
            raise ValueError(
                "sparse_initializers is replaced by encoding: dense | coo | compact "
                "(sparse_initializers: true was coo; compact is smaller)"
            )
        return raw

    @field_validator("opset")
    @classmethod
    def _known_to_onnx(cls, opset: int) -> int:
        if opset > onnx_opset_version():
            raise ValueError(f"the installed onnx knows opsets up to {onnx_opset_version()}, not {opset}")
        return opset


class ValidateConfig(Section):
    min_top1: float | None = Field(None, ge=0, le=1)  # the shipped model's (int8 if quantized)
    # float32 ONNX against torch, on the whole test split: on by default, off with null.
    max_abs_diff: float | None = Field(1e-2, gt=0, le=MAX_FACTOR)
    min_agreement: float | None = Field(0.99, ge=0, le=1)
    max_top1_drop: float | None = Field(0.02, ge=0, le=1)  # int8 top-1 below float32 ONNX top-1
    latency_runs: int = Field(200, ge=1, le=MAX_LATENCY_RUNS)  # batch 1, per model
    throughput_runs: int = Field(20, ge=1, le=MAX_LATENCY_RUNS)  # batch 64, per model
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)


class LogConfig(Section):
    tensorboard: bool = True  # TensorBoard event files in <out>/<name>/tensorboard/<stage> (rank 0)


class DistributedConfig(Section):
    """How the ranks of a torchrun job train together: no effect in one process, and, like
    `device`, no part of a run's fingerprint (the same run, computed by more processes)."""

    sync_bn: bool = False  # BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)
    timeout: int = Field(1800, ge=10, le=86_400)  # seconds a rank waits on its peers before the run fails


class ClusterConfig(Section):
    """What each job asks of a cluster under `--executor ray|slurm` (docs/cluster.md); command
    line options win over it. Like `device`, no part of a run's fingerprint."""

    partition: str | None = None  # Slurm partition
    time: int | None = Field(None, ge=1, le=525_600)  # minutes a job may run (Slurm's --time)
    gpus: int = Field(0, ge=0, le=64)  # per job
    cpus: int = Field(1, ge=1, le=1024)  # per job (per task under tasks_per_node)
    memory: str | None = Field(None, pattern=r"^[1-9][0-9]{0,8}(\.[0-9]+)?[KMGT]$")  # per job, e.g. 16G
    tasks_per_node: int = Field(1, ge=1, le=64)  # Slurm tasks per job: DDP ranks, one per GPU
    local: bool = False  # Slurm: run the jobs on this machine through submitit (no sbatch needed)

    @field_validator("partition")
    @classmethod
    def _slurm_partition(cls, partition: str | None) -> str | None:
        if partition is not None and not is_slurm_partition(partition):
            # Quotes nothing of the value: it may hold a line break, and this must stay one line.
            raise ValueError(f"no Slurm partition name ({SLURM_PARTITION_RULE})")
        return partition


class Pipeline(Section):
    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), allow_inf_nan=False, populate_by_name=True, strict=True
    )

    name: str = Field(pattern=f"^{SAFE_NAME}$")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    bf16: bool = False  # bf16 autocast, on CUDA only
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sparsity: SparsityOptions = Field(default_factory=DEFAULT)  # the method and its own options
    train: OptimConfig = Field(default_factory=OptimConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # `validate` would shadow a pydantic method, hence the alias.
    validation: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    log: LogConfig = Field(default_factory=LogConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("sparsity", mode="before")
    @classmethod
    def _options_of_the_method(cls, section: Any) -> MethodOptions:
        # Dispatched here rather than by the union itself: errors then read `sparsity.<key>`
        # (not `sparsity.<method>.<key>`), and an option of another method says whose it is.
        return parse_method_options(section)

    @model_validator(mode="after")
    def _training_the_method_takes(self):
        self.sparsity.check_training(self.train)  # channel removal within training; deepr's weight decay
        return self
