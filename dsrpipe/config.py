"""The pipeline YAML, validated once at the edge: everything past `load_pipeline` is typed.

Every value is bounded by what makes sense, so that no setting can make a run allocate, loop or
overflow absurdly later on; the YAML itself is read without aliases and with bounded size and
nesting (see `parse_yaml`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from . import files
from .contract import MAX_IMAGE_SIZE
from .errors import UserError

MAX_YAML_BYTES = 2**20
MAX_YAML_DEPTH = 20
MAX_EPOCHS = 10_000
MAX_STEPS = 10**9  # iterations, and weights (prune_target)
MAX_BATCH = 4096
MAX_IMAGES = 10**8
MAX_WORKERS = 64
MAX_SEED = 2**32 - 1  # a 32-bit seed: what every RNG's seeding takes
MAX_LATENCY_RUNS = 10_000
MIN_OPSET = 18  # the torch.export-based exporter writes opset 18 at least, whatever it is asked
MAX_LIST = 100  # milestones, rewire periods, exclude patterns
MAX_OPTIONS, MAX_OPTION_ITEMS, MAX_STRING = 32, 64, 256  # model.options
# Rates, strengths, factors, thresholds: bounded so that no product of them overflows float32 in
# training (train.lr=1e308 used to pass `check` and fail mid-run); far above any useful value.
MAX_FACTOR = 1e6


class Section(BaseModel):
    # strict: a number is a number (`sparsity: false` is no 0.0, `epochs: true` no 1, "3" no 3);
    # an int is still taken where a float is expected (`lr: 1`).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False, strict=True)


SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # a run name is a folder name: no paths, no surprises


def _no_nul(path: Path) -> Path:
    if "\0" in str(path):
        raise ValueError("a path cannot contain a NUL character")
    return path


# An epoch as a mapping key: also its text, which is what a key becomes in JSON (a dumped config read back).
EpochKey = Annotated[int, Strict(False)]


def _path(value: Any) -> Any:
    return Path(value) if isinstance(value, str) else value  # strict mode takes only Path objects


FilePath = Annotated[Path, BeforeValidator(_path), AfterValidator(_no_nul)]


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

        return load_data(
            self.dataset,
            root=self.root,
            download=self.download,
            image_size=self.image_size,
            cache_dir=self.cache_dir,
            num_workers=self.num_workers,
            max_train=self.max_train,
            max_test=self.max_test,
        )


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
        from .models import is_known_model

        if not is_known_model(name):
            raise ValueError(f"unknown model '{name}' (see `dsrpipe models`)")
        return name


# -- sparsity: one options class per method, chosen by `method` ---------------------------------
class MethodOptions(Section):
    """What every method takes: which Conv2d/Linear weights are sparse (flat keys, handed to the
    library as one LayerSelection)."""

    method: str
    dense_first: bool = True  # keep the first conv dense
    dense_last: bool = True  # keep the classifier dense
    # more dense layers (fnmatch on module names); None: the model's defaults
    exclude: list[str] | None = Field(None, max_length=MAX_LIST)
    # instead of the three above: exactly these weights are sparse
    sparse_tensors: list[str] | None = Field(None, max_length=MAX_LIST)

    @model_serializer(mode="wrap")
    def _quiet_defaults(self, handler):
        # Options added later are left out of dumps at their defaults, so fingerprints of runs
        # made before they existed stay current.
        data = handler(self)
        for key, default in (("granularity", "element"), ("remove_channels", None)):
            if key in data and getattr(self, key) == default:
                data.pop(key)
        return data

    @model_validator(mode="after")
    def _one_way_to_choose_layers(self):
        if self.sparse_tensors is not None and (
            self.exclude is not None or {"dense_first", "dense_last"} & self.model_fields_set
        ):
            raise ValueError("give either sparse_tensors or dense_first/dense_last/exclude, not both")
        return self

    @property
    def layers(self):
        """The sparse layers as the library takes them (a dsrpipe.sparse.LayerSelection)."""
        from .sparse import LayerSelection

        return LayerSelection(self.dense_first, self.dense_last, self.exclude, self.sparse_tensors)

    @property
    def source(self) -> tuple[str, Path] | None:
        """The setting naming the finished run this method starts from, and its path (frozen's
        masks_from, prune's prune_from)."""
        return None

    def sparsifier_options(self, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        """The library constructor's keywords (epochs turned into iterations)."""
        return {"layers": self.layers}

    def create(self, model, optimizer, *, seed: int, steps_per_epoch: int, epochs: int, example_inputs=None):
        """The method's sparsifier (dsrpipe.sparse) for this model and optimizer (`example_inputs`:
        one input batch, for the methods that trace the model)."""
        from .sparse import create_sparsifier

        options = self.sparsifier_options(steps_per_epoch=steps_per_epoch, epochs=epochs)
        if "example_inputs" in options:  # the options of a method that traces the model ask for it
            options["example_inputs"] = example_inputs
        return create_sparsifier(self.method, model, optimizer, seed=seed, **options)


class DenseOptions(MethodOptions):
    method: Literal["dense"] = "dense"
    sparsity: float = 0.0  # the grid axis; a dense run has none

    @field_validator("sparsity")
    @classmethod
    def _no_sparsity(cls, sparsity: float) -> float:
        if sparsity != 0:
            raise ValueError(
                "method 'dense' trains every weight: sparsity must be 0 "
                "(thin-dense is the narrower dense model with a sparse budget)"
            )
        return sparsity


class ThinDenseOptions(MethodOptions):
    method: Literal["thin-dense"] = "thin-dense"
    sparsity: float = Field(0.9, ge=0.0, lt=1.0)  # whose parameter budget the narrower model matches


class SparseOptions(MethodOptions):
    sparsity: float = Field(0.9, ge=0.0, lt=1.0)  # of the sparse layers, overall
    distribution: Literal["uniform", "erk"] = "uniform"  # of the active weights over the sparse layers

    def sparsifier_options(self, **shape) -> dict[str, Any]:
        return {
            **super().sparsifier_options(**shape),
            "sparsity": self.sparsity,
            "distribution": self.distribution,
        }


class FromScratchOptions(SparseOptions):
    scale_init: bool = False  # start each sparse tensor at 1/sqrt(density) of its dense init

    def sparsifier_options(self, **shape) -> dict[str, Any]:
        return {**super().sparsifier_options(**shape), "scale_init": self.scale_init}


class GranularityOption(Section):
    """What static, DSR and SET prune and grow as one unit (dsrpipe/sparse/units.py); the other
    methods move single weights only, so they do not take the option."""

    granularity: Literal["element", "kernel", "channel"] = "element"

    def sparsifier_options(self, **shape) -> dict[str, Any]:
        return {**super().sparsifier_options(**shape), "granularity": self.granularity}


class ChannelShape(Section):
    """Which channels may go and what is left of each layer, for channel removal and prune-channels."""

    floor: float = Field(0.1, ge=0, le=1)  # each layer (channel group) keeps at least this share
    # the channels only dense layers write (the input layer's) go too; fewer inputs for the next layer
    dense_layers: bool = True
    # each layer's live channels end at a multiple of this: onnxruntime pads to blocks of 16 (AVX-512)
    multiple_of: int = Field(16, ge=1, le=1024)
    # cut removed channels out of the model as they go, so that the steps after cost what the
    # smaller model costs; false: hold them at zero in the full-width model
    shrink: bool = True

    def shape_options(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "dense_layers": self.dense_layers,
            "multiple_of": self.multiple_of,
            "shrink": self.shrink,
        }


class ChannelRemovalOptions(ChannelShape):
    """Whole channels removed for good during training, their budget regrown (sparse/channels.py)."""

    share: float = Field(ge=0, lt=1)  # of the removable channels, gone by end_epoch
    begin_epoch: int = Field(0, ge=0, le=MAX_EPOCHS)  # removal starts here ...
    end_epoch: int | None = Field(
        None, ge=1, le=MAX_EPOCHS
    )  # ... and is done here; default: half of training

    def end(self, epochs: int) -> int:
        return self.end_epoch if self.end_epoch is not None else max(self.begin_epoch + 1, epochs // 2)

    def removal(self, steps_per_epoch: int, epochs: int):
        """The library's ChannelRemoval (epochs turned into iterations; checked against the
        training epochs by the pipeline)."""
        from .sparse import ChannelRemoval

        begin, end = self.begin_epoch * steps_per_epoch, self.end(epochs) * steps_per_epoch
        return ChannelRemoval(self.share, begin, end, **self.shape_options())


class ChannelRemovalOption(Section):
    """Channel removal, for static, DSR and SET (the rows it is compared with)."""

    remove_channels: ChannelRemovalOptions | None = None

    @model_validator(mode="after")
    def _whole_input_channels(self):
        if self.remove_channels is not None and getattr(self, "granularity", "element") == "channel":
            raise ValueError(
                "remove_channels takes granularity element or kernel: at channel granularity a "
                "removed input channel would split the filters that read it"
            )
        return self

    def sparsifier_options(self, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        options = super().sparsifier_options(steps_per_epoch=steps_per_epoch, epochs=epochs)
        if self.remove_channels is not None:
            options["remove_channels"] = self.remove_channels.removal(steps_per_epoch, epochs)
            options["example_inputs"] = None  # filled in by `create`
        return options


class StaticOptions(ChannelRemovalOption, GranularityOption, FromScratchOptions):
    method: Literal["static"] = "static"


class RewiringOptions(FromScratchOptions):
    rewire_periods: dict[EpochKey, int] = Field(
        {0: 100}, max_length=MAX_LIST
    )  # start epoch -> reallocation period (iterations)
    stop_rewire_epoch: int | None = Field(None, ge=0, le=MAX_EPOCHS)  # no reallocation from this epoch on

    @field_validator("rewire_periods")
    @classmethod
    def _periods_from_epoch_zero(cls, periods: dict[EpochKey, int]) -> dict[EpochKey, int]:
        if 0 not in periods:
            raise ValueError("needs an entry for epoch 0")
        if any(not 0 <= e <= MAX_EPOCHS or not 1 <= p <= MAX_STEPS for e, p in periods.items()):
            raise ValueError(f"epochs must be in 0..{MAX_EPOCHS} and periods in 1..{MAX_STEPS}")
        return dict(sorted(periods.items()))

    def sparsifier_options(self, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        from .sparse import RewireSchedule

        schedule = RewireSchedule(self.rewire_periods, self.stop_rewire_epoch, steps_per_epoch)
        return {
            **super().sparsifier_options(steps_per_epoch=steps_per_epoch, epochs=epochs),
            "schedule": schedule,
        }


class NpOptions(RewiringOptions):
    """N_p, the weights moved per reallocation: a count or a fraction of the active weights."""

    prune_target: int | None = Field(
        None, gt=0, le=MAX_STEPS
    )  # N_p as a count (default when neither: 20,000)
    prune_fraction: float | None = Field(None, gt=0, le=1)  # N_p as a fraction of the active weights

    @model_validator(mode="after")
    def _one_n_p(self):
        if self.prune_target is not None and self.prune_fraction is not None:
            raise ValueError("give N_p as prune_target (a count) or prune_fraction, not both")
        return self

    def sparsifier_options(self, **shape) -> dict[str, Any]:
        return {
            **super().sparsifier_options(**shape),
            "prune_target": self.prune_target,
            "prune_fraction": self.prune_fraction,
        }


class DSROptions(ChannelRemovalOption, GranularityOption, NpOptions):
    method: Literal["dsr"] = "dsr"
    init_threshold: float = Field(0.001, gt=0, le=MAX_FACTOR)  # initial H
    tolerance: float = Field(0.1, ge=0, lt=1)  # δ

    def sparsifier_options(self, **shape) -> dict[str, Any]:
        return {
            **super().sparsifier_options(**shape),
            "init_threshold": self.init_threshold,
            "tolerance": self.tolerance,
        }


class SETOptions(ChannelRemovalOption, GranularityOption, NpOptions):
    method: Literal["set"] = "set"
    zeta: float | None = Field(None, ge=0, le=1)  # fraction replaced per reallocation; default N_p / active

    @model_validator(mode="after")
    def _zeta_or_n_p(self):
        if self.zeta is not None and (self.prune_target is not None or self.prune_fraction is not None):
            raise ValueError("give zeta or N_p (prune_target / prune_fraction), not both")
        return self

    def sparsifier_options(self, **shape) -> dict[str, Any]:
        return {**super().sparsifier_options(**shape), "zeta": self.zeta}


class RigLOptions(RewiringOptions):
    method: Literal["rigl"] = "rigl"
    alpha: float = Field(
        0.3, ge=0, le=1
    )  # initial drop fraction, cosine-decayed to 0 by the stop epoch (else the end)

    def sparsifier_options(self, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        return {
            **super().sparsifier_options(steps_per_epoch=steps_per_epoch, epochs=epochs),
            "alpha": self.alpha,
            "total_steps": epochs * steps_per_epoch,
        }


class DeepROptions(FromScratchOptions):
    method: Literal["deepr"] = "deepr"
    # Noise temperature T, annealed by epoch (epoch -> T), or one value; default: the DSR paper's.
    temperature: float | dict[EpochKey, float] = {0: 1e-5, 25: 1e-8, 80: 1e-12, 140: 1e-15}
    eta: float = Field(0.01, ge=0, le=MAX_FACTOR)  # noise std sqrt(2·eta·T)
    l1: float = Field(1e-5, ge=0, le=MAX_FACTOR)  # L1 strength (its gradient joins the loss gradient)
    stop_rewire_epoch: int | None = Field(
        None, ge=0, le=MAX_EPOCHS
    )  # no noise and no rewiring from this epoch on

    @field_validator("temperature")
    @classmethod
    def _temperature_schedule(cls, temperature):
        values = temperature.values() if isinstance(temperature, dict) else [temperature]
        if isinstance(temperature, dict) and 0 not in temperature:
            raise ValueError("needs an entry for epoch 0")
        if any(not 0 <= v <= MAX_FACTOR for v in values) or (
            isinstance(temperature, dict) and any(not 0 <= e <= MAX_EPOCHS for e in temperature)
        ):
            raise ValueError(f"epochs must be in 0..{MAX_EPOCHS} and temperatures in 0..{MAX_FACTOR:g}")
        return dict(sorted(temperature.items())) if isinstance(temperature, dict) else temperature

    def sparsifier_options(self, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        from .sparse import RewireSchedule

        return {
            **super().sparsifier_options(steps_per_epoch=steps_per_epoch, epochs=epochs),
            "schedule": RewireSchedule({0: 1}, self.stop_rewire_epoch, steps_per_epoch),
            "temperature": self.temperature,
            "eta": self.eta,
            "l1": self.l1,
        }


class PruningSpan(Section):
    begin_epoch: int = Field(0, ge=0, le=MAX_EPOCHS)  # pruning starts (from dense) here ...
    end_epoch: int | None = Field(
        None, ge=1, le=MAX_EPOCHS
    )  # ... and reaches `sparsity` here; then the masks are fixed

    @model_validator(mode="after")
    def _begin_before_end(self):
        if self.end_epoch is not None and self.begin_epoch >= self.end_epoch:
            raise ValueError("begin_epoch must be before end_epoch")
        return self

    def span_options(self, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        end = self.end_epoch * steps_per_epoch if self.end_epoch is not None else None
        return {
            "begin_iteration": self.begin_epoch * steps_per_epoch,
            "end_iteration": end,
            "total_steps": epochs * steps_per_epoch,
        }


class GMPOptions(RewiringOptions, PruningSpan):
    method: Literal["gmp"] = (
        "gmp"  # from scratch; prunes on rewire_periods; end_epoch default: 75% of training
    )

    def sparsifier_options(self, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        return {
            **super().sparsifier_options(steps_per_epoch=steps_per_epoch, epochs=epochs),
            **self.span_options(steps_per_epoch, epochs),
        }


class PruneOptions(SparseOptions, PruningSpan):
    method: Literal["prune"] = "prune"  # end_epoch default: 80% of training
    prune_from: FilePath  # a dense run's train/final.pt (relative to the working directory)
    steps: int = Field(20, ge=1, le=MAX_STEPS)  # pruning steps, evenly spaced, the last at end_epoch

    @property
    def source(self) -> tuple[str, Path] | None:
        return "prune_from", self.prune_from

    def sparsifier_options(self, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        return {
            **super().sparsifier_options(steps_per_epoch=steps_per_epoch, epochs=epochs),
            **self.span_options(steps_per_epoch, epochs),
            "prune_from": self.prune_from,
            "steps": self.steps,
        }


class ChannelPruneOptions(MethodOptions, PruningSpan, ChannelShape):
    method: Literal["prune-channels"] = "prune-channels"  # end_epoch default: half of training
    sparsity: float = 0.0  # the grid axis: the weights stay dense
    prune_from: FilePath  # a dense run's train/final.pt (relative to the working directory)
    share: float = Field(0.5, ge=0, lt=1)  # of the removable channels, removed by end_epoch
    steps: int = Field(5, ge=1, le=MAX_STEPS)  # removal steps, evenly spaced, the last at end_epoch

    @field_validator("sparsity")
    @classmethod
    def _dense_weights(cls, sparsity: float) -> float:
        if sparsity != 0:
            raise ValueError("method 'prune-channels' keeps its weights dense: sparsity must be 0")
        return sparsity

    @property
    def source(self) -> tuple[str, Path] | None:
        return "prune_from", self.prune_from

    def sparsifier_options(self, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
        span = self.span_options(steps_per_epoch, epochs)
        return {
            **super().sparsifier_options(steps_per_epoch=steps_per_epoch, epochs=epochs),
            **span,
            "prune_from": self.prune_from,
            "share": self.share,
            "steps": self.steps,
            **self.shape_options(),
            "example_inputs": None,  # filled in by `create`
        }


class FrozenOptions(MethodOptions):
    method: Literal["frozen"] = "frozen"
    sparsity: float = Field(0.9, ge=0.0, lt=1.0)  # the source run's (a label: the masks decide)
    masks_from: (
        FilePath  # a run's train/final.pt (relative to the working directory) whose final masks to retrain
    )
    init: Literal["fresh", "same"] = "fresh"  # a fresh random init, or the source run's own initial weights
    scale_init: bool = False

    @property
    def source(self) -> tuple[str, Path] | None:
        return "masks_from", self.masks_from

    def sparsifier_options(self, **shape) -> dict[str, Any]:
        return {
            **super().sparsifier_options(**shape),
            "masks_from": self.masks_from,
            "init": self.init,
            "scale_init": self.scale_init,
        }


METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    "dsr": DSROptions,
    "static": StaticOptions,
    "thin-dense": ThinDenseOptions,
    "set": SETOptions,
    "deepr": DeepROptions,
    "rigl": RigLOptions,
    "prune": PruneOptions,
    "prune-channels": ChannelPruneOptions,
    "gmp": GMPOptions,
    "frozen": FrozenOptions,
    "dense": DenseOptions,
}
# The sparsity section's type: a union of the options classes, discriminated by `method`.
SparsityOptions = Annotated[Union[tuple(METHOD_OPTIONS.values())], Field(discriminator="method")]  # noqa: UP007


def parse_method_options(section: Any) -> MethodOptions:
    """The sparsity section as its method's options; an option the method does not take is an
    error naming it (and the methods that do take it)."""
    if isinstance(section, MethodOptions):
        return section
    if not isinstance(section, dict):
        raise ValueError("expected a mapping of settings")
    method = section.get("method", "dsr")
    if not isinstance(method, str) or method not in METHOD_OPTIONS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHOD_OPTIONS)})")
    options = METHOD_OPTIONS[method]
    for key in section:
        if key not in options.model_fields:
            owners = [m for m, o in METHOD_OPTIONS.items() if key in o.model_fields]
            whose = f"an option of {', '.join(owners)}" if owners else "no method's option"
            raise ValueError(
                f"method '{method}' takes no option '{key}' ({whose}; {method} takes: "
                f"{', '.join(k for k in options.model_fields if k != 'method')})"
            )
    return options.model_validate({**section, "method": method})


def switch_method(section: dict[str, Any], method: str) -> dict[str, Any]:
    """A sparsity section switched to another method, as `dsrpipe compare` runs one base pipeline
    with every method of a grid: options only other methods take are dropped; the method's own,
    and keys no method knows (validation names them), are kept."""
    own = METHOD_OPTIONS[method].model_fields
    known = {k for options in METHOD_OPTIONS.values() for k in options.model_fields}
    return {**{k: v for k, v in section.items() if k in own or k not in known}, "method": method}


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
        from onnx.defs import onnx_opset_version  # only when set: importing onnx takes a while

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
    sparsity: SparsityOptions = Field(default_factory=DSROptions)  # the method and its own options
    train: OptimConfig = Field(default_factory=OptimConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # `validate` would shadow a pydantic method, hence the alias.
    validation: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    log: LogConfig = Field(default_factory=LogConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("sparsity", mode="before")
    @classmethod
    def _options_of_the_method(cls, section: Any) -> MethodOptions:
        # Dispatched here rather than by the union itself: errors then read `sparsity.<key>`
        # (not `sparsity.<method>.<key>`), and an option of another method says whose it is.
        return parse_method_options(section)

    @model_validator(mode="after")
    def _removal_within_training(self):
        removal = getattr(self.sparsity, "remove_channels", None)
        if removal is not None:
            end = removal.end(self.train.epochs)
            if end > self.train.epochs or removal.begin_epoch >= end:
                raise ValueError(
                    f"sparsity.remove_channels must begin before it ends, within train.epochs "
                    f"({self.train.epochs}): begin_epoch {removal.begin_epoch}, end_epoch {end}"
                )
        return self

    @model_validator(mode="after")
    def _deepr_without_weight_decay(self):
        if self.sparsity.method == "deepr" and self.train.weight_decay:
            raise ValueError("method 'deepr' regularises with its L1 term: set train.weight_decay: 0")
        return self

    def fingerprint(self, *sections: str) -> str:
        """A hash of the settings a stage's outputs depend on, to tell stale outputs apart."""
        chosen = {s: getattr(self, s) for s in sections}
        text = json.dumps(
            {s: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for s, v in chosen.items()},
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# Which settings each stage's outputs depend on (its own and everything upstream).
TRAIN_SETTINGS = ("seed", "bf16", "data", "model", "sparsity", "train")
FINETUNE_SETTINGS = TRAIN_SETTINGS + ("finetune",)
EXPORT_SETTINGS = FINETUNE_SETTINGS + ("export",)
VALIDATE_SETTINGS = EXPORT_SETTINGS + ("validation",)


def first_error(exc: ValidationError, quote: bool = True) -> tuple[str, str]:
    """(where, what) of a validation error, for a one-line message: the dotted path of the first
    problem ("" at the top level) and what is wrong, with a count of any others. Unless `quote`,
    nothing of the input is repeated: only setting names of the schema, and pydantic's own
    messages (which state the rule, not the value), never an unknown key or a message of ours."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    elif first["type"] == "value_error" and not quote:
        message = "invalid value"
    else:
        message = first["msg"].removeprefix("Value error, ")
    if not quote:
        loc = [part if part in _setting_names() else "…" for part in loc]
        if first["type"] == "extra_forbidden":
            loc[-1:] = ["…"]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ".".join(loc), f"{message}{more}"


@functools.cache
def _setting_names() -> frozenset[str]:
    """Every setting name of the pipeline schema (its sections' fields and aliases)."""
    names, todo = set(), [Pipeline, *METHOD_OPTIONS.values()]
    while todo:
        model = todo.pop()
        for name, field in model.model_fields.items():
            names |= {name, field.alias or name}
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                todo.append(kind)
    return frozenset(names)


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


NOT_QUOTED = "its text is not quoted: it is not a pipeline named on the command line or dropped"


# YAML 1.1 (PyYAML) reads 1e-3 as a string, which strict settings would refuse: read it as YAML 1.2 does.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(data: bytes | str, source: str, quote: bool = True) -> Any:
    """YAML (UTF-8 text, no aliases, nesting bounded) as plain data, or a one-line UserError
    naming `source` (and the line). Unless `quote`, the error repeats nothing the text holds:
    for a file nobody named as a pipeline, which may be any file this process can read."""
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
        raise UserError(f"{source}:{where} not valid YAML ({problem if quote else NOT_QUOTED})") from None
    except Exception as exc:  # what the constructors let through, e.g. a date that is no date
        problem = f"{type(exc).__name__}: {' '.join(str(exc).split())}" if quote else NOT_QUOTED
        raise UserError(f"{source}: not valid YAML ({problem})") from None


def read_yaml(path: Path, what: str, *, follow: bool = True, quote: bool = True) -> Any:
    """A YAML file's data (see `parse_yaml`), or a one-line UserError naming the file. It must be
    a regular file (a FIFO fails at once, see files.open_regular); `follow`: whether a final
    symbolic link is followed."""
    try:
        data = files.read_regular(path, what, MAX_YAML_BYTES, follow=follow)
    except FileNotFoundError:
        raise UserError(f"cannot read {what} {path}: No such file or directory") from None
    return parse_yaml(data, str(path), quote)


def parse_pipeline(raw: Any, source: str = "pipeline", quote: bool = True) -> Pipeline:
    """The validated pipeline, or a one-line UserError (quoting nothing of `raw` unless `quote`)."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of settings at the top level")
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as exc:
        where, what = first_error(exc, quote)
        raise UserError(
            f"{source}: {where or '(top level)'}: {what}{'' if quote else f' ({NOT_QUOTED})'}"
        ) from None


def apply_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """`section.key=value` settings from the command line, values read as YAML, applied to `raw`.

    An override of `sparsity.method` drops the file's sparsity options that the new method does
    not take (as `compare` does for a grid's base), so that `--set sparsity.method=static` just
    works; options given in the overrides themselves, and keys no method knows, stay for
    validation to name. Returns a note for each change the user did not spell out."""
    before = raw.get("sparsity")
    given: set[str] = set()
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
        if parents == ["sparsity"]:
            given.add(leaf)
    section = raw.get("sparsity")
    if "method" not in given or not isinstance(section, dict) or not isinstance(before, dict):
        return []
    method = section["method"]
    if not isinstance(method, str) or method not in METHOD_OPTIONS:
        return []  # validation names the unknown method
    kept = switch_method(section, method)
    dropped = [k for k in section if k not in kept and k not in given]
    raw["sparsity"] = section = {k: v for k, v in section.items() if k not in dropped}
    notes = []
    if dropped:
        notes.append(
            f"sparsity.method={method}: dropped the file's {', '.join(dropped)} ({method} takes no such option)"
        )
    if method in ("dense", "prune-channels") and "sparsity" not in given and section.get("sparsity", 0) != 0:
        notes.append(
            f"sparsity.method={method}: keeps every weight, so sparsity {section['sparsity']} is now 0"
        )
        section["sparsity"] = 0.0
    return notes


def load_pipeline(
    path: str | Path,
    overrides: list[str] = (),
    quote: bool = True,
    note: Callable[[str], None] | None = None,
) -> Pipeline:
    """The pipeline file with its `--set` overrides, validated. `quote`: whether errors may repeat
    its text. `note` hears of what was adjusted or will not take effect (dropped options,
    milestones past the last epoch)."""
    path = Path(path)
    raw = read_yaml(path, "pipeline", quote=quote)
    notes = []
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)  # a pipeline is named after its file unless it says
        notes = apply_overrides(raw, list(overrides))
    cfg = parse_pipeline(raw, str(path), quote)
    for stage in ("train", "finetune"):
        options = getattr(cfg, stage)
        unreached = options.unreached_milestones()
        if unreached and options.epochs:
            notes.append(
                f"{stage}.milestones {unreached} are not reached in {options.epochs} epochs: "
                "the LR schedule never gets to them"
            )
    for message in notes if note else ():
        note(message)
    return cfg


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
                raise UserError(
                    f"{where}: {path} is outside {' and '.join(map(str, allowed))}; "
                    "only paths inside them are allowed here"
                )
