"""set: Sparse Evolutionary Training (Mocanu et al., 2018): each layer replaces its smallest
weights with random new ones in the same layer."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ...sparse import SET, Sparsifier
from .base import ChannelRemovalOption, GranularityOption, NpOptions


class SETOptions(ChannelRemovalOption, GranularityOption, NpOptions):
    sparsifier: ClassVar[type[Sparsifier]] = SET

    method: Literal["set"] = "set"
    zeta: float | None = Field(None, ge=0, le=1)  # fraction replaced per reallocation; default N_p / active

    @model_validator(mode="after")
    def _zeta_or_n_p(self):
        if self.zeta is not None and (self.prune_target is not None or self.prune_fraction is not None):
            raise ValueError("give zeta or N_p (prune_target / prune_fraction), not both")
        return self
