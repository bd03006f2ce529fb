"""rigl: Rigging the Lottery (Evci et al., ICML 2020): per layer, drop the smallest weights and grow
where the dense gradient is largest."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ...sparse import RigL, Sparsifier
from .base import RewiringOptions


class RigLOptions(RewiringOptions):
    sparsifier: ClassVar[type[Sparsifier]] = RigL

    method: Literal["rigl"] = "rigl"
    alpha: float = Field(
        0.3, ge=0, le=1
    )  # initial drop fraction, cosine-decayed to 0 by the stop epoch (else the end)
