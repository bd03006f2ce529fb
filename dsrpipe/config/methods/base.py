"""What every method's options are made of: `MethodOptions`, what each method is asked, and the
option groups that several methods share (a sparse budget, training from scratch, rewiring, N_p,
granularity, channel removal, a pruning span)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ...sparse import LayerSelection, Sparsifier
from ...sparse.cost import CostBudget
from ...trained import ModelSpec
from ..schema import MAX_EPOCHS, MAX_LIST, MAX_STEPS, EpochKey, Section, SettingError


class MethodOptions(Section):
    """A method: what it takes (its fields), the library class that runs it (`sparsifier`), and
    what the rest of dsrpipe asks of it, answered here rather than by branching on its name. Every
    method takes which Conv2d/Linear weights are sparse (flat keys, handed to the library as one
    LayerSelection: `layers`)."""

    # The library's class that trains with the method (dsrpipe.sparse); its constructor takes the
    # options by name (dsrpipe.sparsifiers.sparsifier_options). Each method sets it.
    sparsifier: ClassVar[type[Sparsifier]]
    # Whether it keeps every weight (its sparsity is only a grid label, 0).
    keeps_every_weight: ClassVar[bool] = False
    # Whether it is the reference the others' training time is given against (compare's results:
    # the dense model).
    reference: ClassVar[bool] = False
    # The setting naming the finished run the method starts from (frozen's masks_from, prune's
    # prune_from), None for a method that starts from scratch ...
    source_setting: ClassVar[str | None] = None
    # ... and in a grid, the method whose run (same seed; its sparsity, or 0 for one that keeps
    # every weight) that setting is wired to.
    starts_from: ClassVar[str | None] = None

    method: str
    dense_first: bool = True  # keep the first conv dense
    dense_last: bool = True  # keep the classifier dense
    # more dense layers (fnmatch on module names); None: the model's defaults
    exclude: list[str] | None = Field(None, max_length=MAX_LIST)
    # instead of the three above: exactly these weights are sparse
    sparse_tensors: list[str] | None = Field(None, max_length=MAX_LIST)

    @model_validator(mode="after")
    def _one_way_to_choose_layers(self):
        if self.sparse_tensors is not None and (
            self.exclude is not None or {"dense_first", "dense_last"} & self.model_fields_set
        ):
            raise ValueError("give either sparse_tensors or dense_first/dense_last/exclude, not both")
        return self

    @property
    def source(self) -> tuple[str, Path] | None:
        """The setting naming the finished run this method starts from, and its path (frozen's
        masks_from, prune's prune_from)."""
        if self.source_setting is None:
            return None
        return self.source_setting, getattr(self, self.source_setting)

    @property
    def channel_shape(self) -> ChannelShape | None:
        """The settings of the channels this method removes (floor, dense_layers, multiple_of,
        budget), None where it removes none: such a method traces the model's channel groups."""
        return None

    @property
    def layers(self) -> LayerSelection:
        """The sparse layers as the library takes them."""
        return LayerSelection(self.dense_first, self.dense_last, self.exclude, self.sparse_tensors)

    def check_training(self, train: Section) -> None:
        """A SettingError where the training settings (`train`) contradict the method."""

    def trained_spec(self, configured: ModelSpec, note: Callable[[str], None]) -> ModelSpec:
        """The model the method trains, from the configured one (`note`: where to say what it
        changed)."""
        return configured


class SparseOptions(MethodOptions):
    sparsity: float = Field(0.9, ge=0.0, lt=1.0)  # of the sparse layers, overall
    distribution: Literal["uniform", "erk"] = "uniform"  # of the active weights over the sparse layers


class FromScratchOptions(SparseOptions):
    scale_init: bool = False  # start each sparse tensor at 1/sqrt(density) of its dense init


class GranularityOption(Section):
    """What static, DSR and SET prune and grow as one unit (dsrpipe/sparse/units.py); the other
    methods move single weights only, so they do not take the option."""

    added_later = {"granularity": "element"}

    granularity: Literal["element", "kernel", "channel"] = "element"


class ChannelShape(Section):
    """Which channels may go and what is left of each layer, for channel removal and prune-channels."""

    added_later = {"macs": None, "latency": None}

    floor: float = Field(0.1, ge=0, le=1)  # each layer (channel group) keeps at least this share
    # the channels only dense layers write (the input layer's) go too; fewer inputs for the next layer
    dense_layers: bool = True
    # each layer's live channels end at a multiple of this: onnxruntime pads to blocks of 16 (AVX-512)
    multiple_of: int = Field(16, ge=1, le=1024)
    # cut removed channels out of the model as they go, so that the steps after cost what the
    # smaller model costs; false: hold them at zero in the full-width model
    shrink: bool = True
    # instead of a share of the channels, a cost to end at: this share of the dense model's MACs
    # (convolutions and linear layers), or of its onnxruntime latency on this machine (batch 1)
    macs: float | None = Field(None, gt=0, lt=1)
    latency: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_target(self):
        targets = [name for name in ("macs", "latency") if getattr(self, name) is not None]
        if "share" in self.model_fields_set:
            targets.insert(0, "share")
        if len(targets) > 1:
            raise ValueError(f"give one target of share, macs and latency, not {' and '.join(targets)}")
        return self

    @property
    def budget(self) -> CostBudget | None:
        """The cost the channels are removed down to, if one is given rather than a share."""
        for measure in ("macs", "latency"):
            if (share := getattr(self, measure)) is not None:
                return CostBudget(measure, share)
        return None


class ChannelRemovalOptions(ChannelShape):
    """Whole channels removed for good during training, their budget regrown (sparse/channels.py)."""

    added_later = {"dense_inside": False}

    share: float | None = Field(None, ge=0, lt=1)  # of the removable channels, gone by end_epoch
    # speed first: after the last removal every weight of the live channels trains (a dense net of
    # the learned widths); false: the budget stays sparse inside them (the smallest file)
    dense_inside: bool = False
    begin_epoch: int = Field(0, ge=0, le=MAX_EPOCHS)  # removal starts here ...
    end_epoch: int | None = Field(
        None, ge=1, le=MAX_EPOCHS
    )  # ... and is done here; default: half of training

    @model_validator(mode="after")
    def _a_target(self):
        if self.share is None and self.budget is None:
            raise ValueError("give a target: share (of the channels), macs or latency (of the dense model's)")
        return self

    def end(self, epochs: int) -> int:
        return self.end_epoch if self.end_epoch is not None else max(self.begin_epoch + 1, epochs // 2)


class ChannelRemovalOption(Section):
    """Channel removal, for static, DSR and SET (the rows it is compared with)."""

    added_later = {"remove_channels": None}

    remove_channels: ChannelRemovalOptions | None = None

    @model_validator(mode="after")
    def _whole_input_channels(self):
        if self.remove_channels is not None and getattr(self, "granularity", "element") == "channel":
            raise ValueError(
                "remove_channels takes granularity element or kernel: at channel granularity a "
                "removed input channel would split the filters that read it"
            )
        return self

    @property
    def channel_shape(self) -> ChannelShape | None:
        return self.remove_channels

    def check_training(self, train: Section) -> None:
        removal = self.remove_channels
        if removal is None:
            return
        epochs, begin, end = train.epochs, removal.begin_epoch, removal.end(train.epochs)
        # The key to change: begin_epoch when it is not before the end (its default end, half of
        # training, is never before it), else end_epoch, which then lies past training.
        key = "begin_epoch" if begin >= min(end, epochs) else "end_epoch"
        if end > epochs or begin >= end:
            raise SettingError(
                f"sparsity.remove_channels.{key}",
                f"channel removal must begin before it ends, within train.epochs ({epochs}): "
                f"begin_epoch {begin}, end_epoch {end}",
            )


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


class PruningSpan(Section):
    begin_epoch: int = Field(0, ge=0, le=MAX_EPOCHS)  # pruning starts (from dense) here ...
    end_epoch: int | None = Field(
        None, ge=1, le=MAX_EPOCHS
    )  # ... and reaches `sparsity` here; then the masks are fixed

    @model_validator(mode="after")
    def _begin_before_end(self):
        if self.end_epoch is not None and self.begin_epoch >= self.end_epoch:
            raise SettingError(
                "begin_epoch", f"begin_epoch {self.begin_epoch} must be before end_epoch {self.end_epoch}"
            )
        return self
