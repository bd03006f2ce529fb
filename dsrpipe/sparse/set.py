"""Sparse Evolutionary Training (SET; Mocanu et al., Nature Communications 2018), as the DSR paper
ran it as a baseline.

Every period, each sparse tensor on its own: prune the fraction `zeta` of its active weights with
the smallest magnitude, then regrow as many at random free positions of the SAME tensor, starting
from zero. Unlike DSR there is no global threshold and no reallocation between layers: every
tensor keeps the sparsity it started with.

For a fair comparison the DSR paper chose `zeta` so that each step moves about DSR's N_p weights
(0.138 of the active weights for WRN-28-2 at 0.9 sparsity, with N_p = 20,000), on DSR's own rewire
schedule. So by default `zeta` = N_p / active weights, N_p given as for DSR (`prune_target` or
`prune_fraction`); an explicit `zeta` replaces that.

At kernel or channel granularity (units.py) whole kernels or filters move: the fraction `zeta` of
a tensor's active units with the smallest mean |w|, regrown as that many whole units of the same
tensor, so every tensor keeps its active count exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from .base import Sparsifier
from .budgets import sample_free_positions
from .dsr import prune_count


class SET(Sparsifier):
    method = "set"
    tracks_regrowth = True

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        prune_target: int | None = None,
        prune_fraction: float | None = None,
        zeta: float | None = None,
        **kwargs,
    ):
        super().__init__(model, optimizer, **kwargs)
        if zeta is None:
            if prune_target is None and prune_fraction is not None:
                zeta = prune_fraction
            else:
                active = self.active_count()
                n_p = prune_count(self, prune_target, prune_fraction)
                if self.masks and n_p > active:
                    raise UserError(
                        f"set: N_p = {n_p} is more than the {active} active weights; "
                        "give a smaller prune_target or a prune_fraction"
                    )
                zeta = n_p / active if active else 0.0
        elif prune_target is not None or prune_fraction is not None:
            raise UserError("set: give zeta or N_p (prune_target / prune_fraction), not both")
        if not 0.0 <= zeta <= 1.0:
            raise UserError(f"zeta must be in [0, 1], got {zeta}")
        self.zeta = zeta  # fraction of each tensor's active weights replaced per reallocation

    @torch.no_grad()
    def reallocate(self) -> dict[str, Any]:
        grown = {}
        for name, num_active in self.active_per_tensor().items():
            # Single weights, or whole kernels or filters (units.py)
            u, m = self.units[name], self.masks[name]
            active_units = num_active // u.size
            count = round(self.zeta * active_units)
            # 1. Prune exactly `count` smallest-magnitude active units.
            pruned = u.of(self.drop_smallest(name, count))
            # Their momentum too, now: a unit regrown in this same step (when free units are scarce)
            # must restart from rest like any other grown weight.
            self.clear_optimizer_state()
            # 2. Regrow as many in this tensor, at random free units other than those just pruned
            #    (unless nothing else is free), never in a removed channel (channels.py).
            active = u.of(m)
            free = self.free_units(name, active_units)
            slots = self.growth_slots(name, active | pruned)
            if free < count:
                slots, free = self.growth_slots(name, active), free + count
            u.activate(m, sample_free_positions(slots.view(-1), count, free, self.generator))
            grown[name] = count * u.size
        return {"iteration": self.iteration, "pruned": sum(grown.values()), "grown": grown}
