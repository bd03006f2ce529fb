"""prune-channels: a deployer's structured pruning of a trained dense run (Torch-Pruning): whole
channel groups removed in equal steps, then fine-tuning; the weights stay dense."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ...sparse import ChannelPrune, Sparsifier
from ..schema import MAX_STEPS, FilePath
from .base import ChannelShape, MethodOptions, PruningSpan


class ChannelPruneOptions(MethodOptions, PruningSpan, ChannelShape):
    sparsifier: ClassVar[type[Sparsifier]] = ChannelPrune
    keeps_every_weight: ClassVar[bool] = True
    source_setting: ClassVar[str | None] = "prune_from"
    starts_from: ClassVar[str | None] = "dense"

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
    def channel_shape(self) -> ChannelShape | None:
        return self  # the method's own settings say which channels go
