"""Sparse Evolutionary Training (SET; Mocanu et al., Nature Communications 2018).

Every period, each sparse tensor on its own: prune the fraction `zeta` of its active weights with
the smallest magnitude, then regrow as many at random free positions of the SAME tensor, starting
from zero. Unlike DSR there is no global threshold and no reallocation between layers: every
tensor keeps the sparsity it started with.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from .base import Sparsifier, sample_free_positions


class SET(Sparsifier):
    method = "set"

    def __init__(self, model, optimizer=None, *, zeta: float = 0.3, **kwargs):
        if not 0.0 <= zeta <= 1.0:
            raise UserError(f"zeta must be in [0, 1], got {zeta}")
        super().__init__(model, optimizer, **kwargs)
        self.zeta = zeta  # fraction of each tensor's active weights replaced per reallocation

    @torch.no_grad()
    def reallocate(self) -> dict[str, Any]:
        grown = {}
        for name, num_active in self.active_per_tensor().items():
            count = round(self.zeta * num_active)
            # 1. Prune exactly `count` smallest-magnitude active weights.
            pruned = self.drop_smallest(name, count)
            # 2. Regrow as many in this tensor, at random free positions other than those just
            #    pruned (unless nothing else is free).
            m = self.masks[name]
            free = m.numel() - num_active
            slots = ~(m | pruned)
            if free < count:
                slots, free = ~m, free + count
            m.view(-1)[sample_free_positions(slots.view(-1), count, free, self.generator)] = True
            grown[name] = count
        self.clear_optimizer_state()  # grown weights are 0 already; their momentum too now
        return {"iteration": self.iteration, "pruned": sum(grown.values()), "grown": grown}
