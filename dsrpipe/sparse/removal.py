"""What channel removal is asked to do: how much goes (a share of the channels, or down to a cost
budget), when (between two iterations, on a cubic curve or in equal steps), what each group keeps,
and whether the live channels end dense (speed first) or sparse (the smallest file)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from .cost import CostBudget


@dataclass(frozen=True)
class ChannelRemoval:
    """Remove `share` of the removable channels between iterations `begin` and `end`, each group
    keeping at least `floor` of its channels; `steps`: how many removal events (evenly spaced,
    the last at `end`), or None to remove whenever the method's schedule is due (cubic curve);
    `dense_layers`: the channels that only dense layers write (the input layer's) are removable
    too, ranked by those layers' filters; `multiple_of`: after the last removal each group's
    live channels are a multiple of it (or all), the removed count as near the share's as the
    multiples allow; `shrink`: after each removal, cut the removed channels out of the model
    (`Sparsifier.shrink`), so that training costs what the smaller model costs, rather than
    holding them at zero. `budget`: instead of a share of the channels, remove until the model
    keeps at most a share of the dense model's MACs or latency (cost.py), the channels ranked by
    their score for what removing them saves; `dense_inside`: after the last removal every weight
    of the live channels becomes active (speed first: the shipped model is a plain dense network
    of the learned widths), where otherwise the budget stays sparse inside them (the smallest
    file)."""

    share: float
    begin: int = 0
    end: int = 1
    floor: float = 0.1
    steps: int | None = None
    dense_layers: bool = True
    # onnxruntime's CPU convolutions work in blocks of 16 channels on AVX-512 (8 on AVX2) and pad
    # the rest: 33 live channels cost what 48 do (docs/methods.md, "Channel removal").
    multiple_of: int = 16
    shrink: bool = True
    budget: CostBudget | None = None
    dense_inside: bool = False

    def __post_init__(self):
        if not 0.0 <= self.share < 1.0:
            raise UserError(f"channel share must be in [0, 1), got {self.share}")
        if not 0.0 <= self.floor <= 1.0:
            raise UserError(f"channel floor must be in [0, 1], got {self.floor}")
        if not 0 <= self.begin < self.end:
            raise UserError(
                f"channel removal must begin before it ends (iterations {self.begin}, {self.end})"
            )
        if self.steps is not None and self.steps < 1:
            raise UserError(f"channel removal steps must be at least 1, got {self.steps}")
        if self.multiple_of < 1:
            raise UserError(f"channel multiple_of must be at least 1, got {self.multiple_of}")

    @property
    def removes(self) -> bool:
        """Whether anything is to go (fine-tuning holds a trained run's channels, removing none)."""
        return self.share > 0 or self.budget is not None

    def last(self, iteration: int) -> bool:
        """Whether the removal after step `iteration` is the last one (it completes the plan)."""
        return iteration >= self.end

    def progress(self, iteration: int) -> float:
        """The part of the removal done by `iteration`: in equal steps, or on a cubic curve."""
        progress = min(max((iteration - self.begin) / (self.end - self.begin), 0.0), 1.0)
        if self.steps is not None:
            return math.floor(progress * self.steps + 1e-9) / self.steps
        return 1 - (1 - progress) ** 3

    def target(self, iteration: int, removable: int) -> int:
        """Channels removed in all by `iteration`."""
        return round(self.share * removable * self.progress(iteration))

    def due(self, iteration: int, scheduled: bool) -> bool:
        """Whether to remove after step `iteration`, `scheduled`: whether the method reallocates now."""
        if not self.begin < iteration <= self.end:
            return False
        if self.steps is None:
            return scheduled or iteration == self.end
        span = self.end - self.begin
        return any(iteration == self.begin + round(span * k / self.steps) for k in range(1, self.steps + 1))
