"""prune: gradual magnitude pruning (Zhu & Gupta, 2017) of a trained dense run, then fine-tuning."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ...sparse import Prune, Sparsifier
from ..schema import MAX_STEPS, FilePath
from .base import PruningSpan, SparseOptions


class PruneOptions(SparseOptions, PruningSpan):
    sparsifier: ClassVar[type[Sparsifier]] = Prune
    source_setting: ClassVar[str | None] = "prune_from"
    starts_from: ClassVar[str | None] = "dense"

    method: Literal["prune"] = "prune"  # end_epoch default: 80% of training
    prune_from: FilePath  # a dense run's train/final.pt (relative to the working directory)
    steps: int = Field(20, ge=1, le=MAX_STEPS)  # pruning steps, evenly spaced, the last at end_epoch
