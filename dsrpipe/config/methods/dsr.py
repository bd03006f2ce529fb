"""dsr: Dynamic Sparse Reparameterization (Mostafa & Wang, ICML 2019; sparse/dsr.py, Algorithm 1):
one global adaptive threshold, growth across layers in proportion to what each kept."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ...sparse import DSR, Sparsifier
from ..schema import MAX_FACTOR
from .base import ChannelRemovalOption, GranularityOption, NpOptions


class DSROptions(ChannelRemovalOption, GranularityOption, NpOptions):
    sparsifier: ClassVar[type[Sparsifier]] = DSR

    method: Literal["dsr"] = "dsr"
    init_threshold: float = Field(0.001, gt=0, le=MAX_FACTOR)  # initial H
    tolerance: float = Field(0.1, ge=0, lt=1)  # δ
