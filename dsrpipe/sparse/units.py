"""Structured granularity: a sparse weight tensor seen as whole units that are pruned and grown together.

    element   one weight (unstructured sparsity; the default)
    kernel    one k×k kernel weight[o, i] of a Conv2d (the DSR authors' "sub-kernel granularity");
              a Linear weight has no kernels, so there a unit is one element
    channel   one output filter weight[o] of a Conv2d, or one row of a Linear weight

A unit is a run of `size` consecutive elements of the row-major (contiguous) tensor, so the units
of a tensor are the rows of `tensor.reshape(-1, size)`. Masks stay elementwise bool tensors for
everything else (gradient masking, checkpoints, export), but at a coarser granularity they are
always unions of whole units. A unit's magnitude is its mean |w|: one global threshold then
compares units of different sizes fairly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError

GRANULARITIES = ("element", "kernel", "channel")


def unit_size(shape: tuple[int, ...], granularity: str) -> int:
    """Elements per unit of a weight of `shape` (out, in[, kh, kw])."""
    if granularity == "element":
        return 1
    if granularity == "kernel":
        return math.prod(shape[2:])  # a Linear weight (out, in) has no kernel dimensions: 1
    if granularity == "channel":
        return math.prod(shape[1:])
    raise UserError(f"unknown granularity '{granularity}' (known: {', '.join(GRANULARITIES)})")


@dataclass(frozen=True)
class Units:
    """One weight tensor as `count` units of `size` elements. At size 1 every method is the
    identity, so element granularity runs exactly the elementwise code, with no extra work."""

    shape: torch.Size
    size: int

    @property
    def count(self) -> int:
        return math.prod(self.shape) // self.size

    def magnitude(self, weight: torch.Tensor) -> torch.Tensor:
        """|w| of each element, or mean |w| of each unit (a [count] tensor)."""
        magnitude = weight.detach().abs()
        return magnitude if self.size == 1 else magnitude.reshape(-1, self.size).mean(1)

    def of(self, mask: torch.Tensor) -> torch.Tensor:
        """The unit mask of an elementwise mask that is a union of units (the mask itself at size 1)."""
        return mask if self.size == 1 else mask.view(-1, self.size)[:, 0].contiguous()

    def expand(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """The elementwise mask (the weight's shape, contiguous) of a unit mask."""
        if self.size == 1:
            return unit_mask
        return unit_mask.repeat_interleave(self.size).view(self.shape)

    def activate(self, mask: torch.Tensor, indices: torch.Tensor) -> None:
        """Switch on the units at flat unit `indices` in the (contiguous) elementwise `mask`."""
        mask.view(-1, self.size)[indices] = True

    def whole(self, mask: torch.Tensor) -> bool:
        """Whether an elementwise mask is a union of whole units."""
        if self.size == 1:
            return True
        rows = mask.reshape(-1, self.size)
        return bool((rows == rows[:, :1]).all())
