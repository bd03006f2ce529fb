"""Deep Rewiring (DeepR; Bellec et al., ICLR 2018), as the DSR paper ran it as a baseline.

Every connection has a fixed sign. After EVERY optimizer step (not periodically), each active
weight w with sign s takes the rest of the DeepR update: an L1 pull toward zero and Gaussian noise,
    w ← w − lr·α·s + sqrt(2·lr·T)·ν,        ν ~ N(0, 1)
(lr: the optimizer's current learning rate). A connection whose weight ends up strictly on the
wrong side of zero (w·s < 0) goes dormant at once: mask 0, weight 0. As many dormant connections
are reactivated, uniformly at random over the whole network (not per tensor), each with a fresh
random sign and weight exactly 0 (and zero momentum), so the total count never changes. Unlike
DSR there is no threshold and no proportional allocation: pruning is driven by sign flips, and
layers gain or lose connections only by chance. Only the schedule's `stop_epoch` applies.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UserError
from .base import RewireSchedule, Sparsifier, sample_free_positions


def distinct_ranks(total: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct integers drawn uniformly from range(total), for count ≪ total.

    Each round draws as many as are still missing and keeps the new distinct values; the procedure
    treats every value alike, so every subset of size `count` is equally likely."""
    device = generator.device
    chosen = torch.empty(0, dtype=torch.long, device=device)
    while chosen.numel() < count:
        draws = torch.randint(total, (count - chosen.numel(),), generator=generator, device=device)
        chosen = torch.cat([chosen, torch.unique(draws[~torch.isin(draws, chosen)])])
    return chosen


class DeepR(Sparsifier):
    method = "deepr"

    def __init__(self, model, optimizer=None, *, temperature: float = 1e-8, l1: float = 1e-5, **kwargs):
        if optimizer is None:
            raise ValueError("DeepR needs the optimizer: its learning rate scales the noise and the L1 step")
        if temperature < 0 or l1 < 0:
            raise UserError("DeepR needs temperature >= 0 and l1 >= 0")
        super().__init__(model, optimizer, **kwargs)
        self.temperature, self.l1 = temperature, l1
        # Rewire after every step, up to the schedule's stop epoch.
        self.schedule = RewireSchedule({0: 1}, self.schedule.stop_epoch, self.schedule.steps_per_epoch)
        # The fixed sign of each connection (True: positive); meaningful where the mask is 1.
        self.signs = {n: self.weights[n].detach() > 0 for n in self.masks}

    @torch.no_grad()
    def reallocate(self) -> dict[str, Any]:
        names = list(self.masks)
        weights = [self.weights[n] for n in names]
        masks = [self.masks[n] for n in names]
        signs = [self.signs[n] for n in names]
        lr = self.optimizer.param_groups[0]["lr"]
        noise_std = math.sqrt(2 * lr * self.temperature)

        # 1. The L1 step and the noise, on active weights only.
        flipped = []
        for w, m, s in zip(weights, masks, signs):
            step = torch.where(s, -lr * self.l1, lr * self.l1).to(w.dtype)
            if noise_std:
                step += noise_std * torch.randn(w.shape, generator=self.generator, device=w.device, dtype=w.dtype)
            w.addcmul_(step, m)
            # 2. A weight strictly on the wrong side of zero goes dormant.
            f = m & (w != 0) & ((w > 0) != s)
            m.logical_and_(~f)
            w.masked_fill_(f, 0.0)
            flipped.append(f)
        counts = torch.stack([torch.stack([f.sum(), m.sum()]) for f, m in zip(flipped, masks)])
        num_flipped, num_active = map(list, zip(*counts.tolist()))
        total = sum(num_flipped)
        if total == 0:
            return {"iteration": self.iteration, "pruned": 0, "grown": dict.fromkeys(names, 0)}

        # 3. Reactivate as many dormant connections, uniformly over the whole network, other
        #    than those that just went dormant (unless nothing else is free).
        free = [w.numel() - a for w, a in zip(weights, num_active)]  # num_active: after pruning
        reuse = sum(free) - total < total
        if not reuse:
            free = [f - k for f, k in zip(free, num_flipped)]
        ranks = distinct_ranks(sum(free), total, self.generator)
        bounds = torch.tensor(free, device=ranks.device).cumsum(0)
        grown = torch.bincount(torch.bucketize(ranks, bounds, right=True), minlength=len(names)).tolist()
        for w, m, s, f, g, n_free in zip(weights, masks, signs, flipped, grown, free):
            slots = ~m if reuse else ~(m | f)
            positions = sample_free_positions(slots.view(-1), g, n_free, self.generator)
            m.view(-1)[positions] = True
            s.view(-1)[positions] = torch.rand(g, generator=self.generator, device=w.device) < 0.5
        self.clear_optimizer_state()  # dormant and reactivated weights: momentum 0
        return {"iteration": self.iteration, "pruned": total, "grown": dict(zip(names, grown))}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "signs": {n: s.clone() for n, s in self.signs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, sign in state["signs"].items():
            self.signs[name].copy_(sign)
