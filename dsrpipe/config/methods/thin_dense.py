"""thin-dense: a dense model narrowed until its parameter count matches the sparse budget
(sparse/thin.py), trained densely."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import Field

from ...sparse import Dense, Sparsifier
from ...sparse.thin import thin_model_options
from ...trained import ModelSpec
from .base import MethodOptions


class ThinDenseOptions(MethodOptions):
    sparsifier: ClassVar[type[Sparsifier]] = Dense

    method: Literal["thin-dense"] = "thin-dense"
    sparsity: float = Field(0.9, ge=0.0, lt=1.0)  # whose parameter budget the narrower model matches

    def trained_spec(self, configured: ModelSpec, note: Callable[[str], None]) -> ModelSpec:
        """The narrower dense model with the sparse model's parameter count."""
        narrowed, params, budget = thin_model_options(
            configured.name,
            configured.options,
            num_classes=configured.num_classes,
            in_channels=configured.in_channels,
            image_size=configured.image_size,
            sparsity=self.sparsity,
            layers=self.layers,
        )
        note(
            f"thin-dense: {narrowed} gives {params:,} parameters for a budget of {budget:,} "
            f"({params / budget - 1:+.1%})"
        )
        return ModelSpec(
            **{
                **configured.to_dict(),
                "options": narrowed,
                "thin_dense": {"params": params, "budget": budget},
            }
        )
