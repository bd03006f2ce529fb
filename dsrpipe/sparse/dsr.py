"""Dynamic Sparse Reparameterization (Mostafa & Wang, ICML 2019), Algorithm 1.

Every few hundred iterations: prune, in every sparse tensor, the active weights whose magnitude
is below one global threshold H; adapt H so that the next step prunes about N_p weights; regrow
exactly as many connections as were pruned, giving each tensor a share proportional to the
weights it kept, at random free positions, starting from zero. The total number of non-zero
parameters never changes, but layers trade budget with each other.

N_p is a count (`prune_target`; the paper: 20,000 for WRN-28-2, 400,000 for ResNet-50) or a
fraction of the active weights (`prune_fraction`; the paper's WRN-28-2 runs at 0.9 sparsity:
about 0.14), so that a small model can follow the paper's ratio.

At kernel or channel granularity (units.py) whole kernels or filters are pruned and grown: a unit
is pruned when its mean |w| is below H; K, N_p and the shares of growth count weights, growth
places whole units, and the total of active weights stays exactly the same (`split_in_units`
finds whole units that hold exactly K weights; the units just pruned always can).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from .base import Sparsifier
from .budgets import sample_free_positions, split_in_units

DEFAULT_PRUNE_TARGET = 20_000  # the paper's N_p for WRN-28-2 on CIFAR-10


def prune_count(sparsifier: Sparsifier, prune_target: int | None, prune_fraction: float | None) -> int:
    """N_p from a count or a fraction of the sparsifier's active weights (the paper's count when
    neither is given)."""
    if prune_target is not None and prune_fraction is not None:
        raise UserError(
            "give N_p as prune_target (a count) or prune_fraction (of the active weights), not both"
        )
    if prune_fraction is not None:
        if not 0.0 < prune_fraction <= 1.0:
            raise UserError(f"prune_fraction must be in (0, 1], got {prune_fraction}")
        return max(1, round(prune_fraction * sparsifier.active_count()))
    prune_target = DEFAULT_PRUNE_TARGET if prune_target is None else prune_target
    if prune_target < 1:
        raise UserError(f"prune_target must be at least 1, got {prune_target}")
    return prune_target


class DSR(Sparsifier):
    method = "dsr"
    tracks_regrowth = True

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        prune_target: int | None = None,
        prune_fraction: float | None = None,
        init_threshold: float = 0.001,
        tolerance: float = 0.1,
        **kwargs,
    ):
        super().__init__(model, optimizer, **kwargs)
        self.prune_target = prune_count(self, prune_target, prune_fraction)  # N_p
        self.threshold = init_threshold  # H
        self.tolerance = tolerance  # δ

    @torch.no_grad()
    def reallocate(self) -> dict[str, Any]:
        names = list(self.masks)
        weights = [self.weights[n] for n in names]
        masks = [self.masks[n] for n in names]
        units = [self.units[n] for n in names]  # single weights, or whole kernels or filters (units.py)
        sizes = [u.size for u in units]
        active = [u.of(m) for u, m in zip(units, masks)]

        # 1. Prune active units below H in every tensor (a unit's magnitude: |w|, or its mean |w|).
        pruned = [a & (u.magnitude(w) < self.threshold) for u, w, a in zip(units, weights, active)]
        counts = torch.stack([torch.stack([p.sum(), a.sum()]) for p, a in zip(pruned, active)])
        num_pruned, num_active = map(list, zip(*counts.tolist()))  # the one host sync (in units)
        for i, (u, w, a, p) in enumerate(zip(units, weights, active, pruned)):
            if num_pruned[i] == num_active[i] > 0:  # never empty a tensor: spare its largest unit
                p.view(-1)[(u.magnitude(w) * a).argmax()] = False
                num_pruned[i] -= 1
        for w, m, u, p in zip(weights, masks, units, pruned):
            p = u.expand(p)
            m.logical_and_(~p)
            w.masked_fill_(p, 0.0)
        # Their momentum too, now: a position regrown in this same step (when free slots are
        # scarce) must restart from rest like any other grown weight.
        self.clear_optimizer_state()
        kept = [(a - k) * s for a, k, s in zip(num_active, num_pruned, sizes)]  # in weights, as K and N_p
        total_pruned = sum(k * s for k, s in zip(num_pruned, sizes))

        # 2. Adapt the threshold so that the next step prunes about N_p weights.
        threshold_used = self.threshold
        if total_pruned < (1 - self.tolerance) * self.prune_target:
            self.threshold *= 2
        elif total_pruned > (1 + self.tolerance) * self.prune_target:
            self.threshold /= 2

        # 3. Regrow as many weights as were pruned, in whole units, in proportion to what each tensor
        #    kept, at random free units other than those just pruned (unless they cannot hold exactly
        #    as many), never in a removed channel (channels.py).
        free = [self.free_units(n, a) for n, a in zip(names, num_active)]
        grown = split_in_units(total_pruned, kept, free, sizes)
        reuse_pruned = grown is None
        if reuse_pruned:
            free = [f + k for f, k in zip(free, num_pruned)]
            grown = split_in_units(total_pruned, kept, free, sizes)  # the pruned units alone can
        for n, u, m, p, g, f in zip(names, units, masks, pruned, grown, free):
            a = u.of(m)
            slots = self.growth_slots(n, a if reuse_pruned else a | p)
            u.activate(m, sample_free_positions(slots.view(-1), g, f, self.generator))
        # Grown weights are already exactly 0 and at rest: masked weights and their momentum always are.

        return {
            "iteration": self.iteration,
            "threshold": threshold_used,
            "next_threshold": self.threshold,
            "pruned": total_pruned,
            "grown": {n: g * s for n, g, s in zip(names, grown, sizes)},
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.threshold = state["threshold"]
