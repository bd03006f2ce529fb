"""gmp: gradual magnitude pruning (Zhu & Gupta, 2017) from scratch, within the run's own epochs."""

from __future__ import annotations

from typing import ClassVar, Literal

from ...sparse import GradualPrune, Sparsifier
from .base import PruningSpan, RewiringOptions


class GMPOptions(RewiringOptions, PruningSpan):
    sparsifier: ClassVar[type[Sparsifier]] = GradualPrune

    method: Literal["gmp"] = (
        "gmp"  # from scratch; prunes on rewire_periods; end_epoch default: 75% of training
    )
