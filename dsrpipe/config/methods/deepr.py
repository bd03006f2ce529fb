"""deepr: Deep Rewiring (Bellec et al., ICLR 2018): L1 and annealed noise join the gradient; a
connection that crosses zero dies and one regrows at random in the same tensor."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ...sparse import DeepR, Sparsifier
from ..schema import MAX_EPOCHS, MAX_FACTOR, EpochKey, Section, SettingError
from .base import FromScratchOptions


class DeepROptions(FromScratchOptions):
    sparsifier: ClassVar[type[Sparsifier]] = DeepR

    method: Literal["deepr"] = "deepr"
    # Noise temperature T, annealed by epoch (epoch -> T), or one value; default: the DSR paper's.
    temperature: float | dict[EpochKey, float] = {0: 1e-5, 25: 1e-8, 80: 1e-12, 140: 1e-15}
    eta: float = Field(0.01, ge=0, le=MAX_FACTOR)  # noise std sqrt(2·eta·T)
    l1: float = Field(1e-5, ge=0, le=MAX_FACTOR)  # L1 strength (its gradient joins the loss gradient)
    stop_rewire_epoch: int | None = Field(
        None, ge=0, le=MAX_EPOCHS
    )  # no noise and no rewiring from this epoch on

    def check_training(self, train: Section) -> None:
        if train.weight_decay:
            raise SettingError(
                "train.weight_decay", "method 'deepr' regularises with its L1 term: set train.weight_decay: 0"
            )

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
