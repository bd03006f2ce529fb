"""dense: the full dense model, every weight trained (the reference)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import field_validator

from ...sparse import Dense, Sparsifier
from .base import MethodOptions


class DenseOptions(MethodOptions):
    sparsifier: ClassVar[type[Sparsifier]] = Dense
    keeps_every_weight: ClassVar[bool] = True
    reference: ClassVar[bool] = True

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
