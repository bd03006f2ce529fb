"""Deep Rewiring (DeepR; Bellec et al., ICLR 2018), as the DSR paper ran it as a baseline (the
authors' reference code, IntelAI/dynamic-reparameterization, option `--DeepR`).

Every active connection has a sign. Two terms are added to the gradient of its weight before the
optimizer step, so that, like the loss gradient, they pass through momentum (Nesterov SGD in the
paper):
    l1 · sign(w)                  the gradient of the L1 penalty l1·Σ|w|, and
    sqrt(2 · eta · T) · ν         Gaussian noise, ν ~ N(0, 1), on active weights only,
with a temperature T annealed by epoch (the paper's WRN-28-2 schedule: 1e-5, then 1e-8 from epoch
25, 1e-12 from 80, 1e-15 from 140; eta = 0.01: the default, given the schedule's steps_per_epoch).
The L1 term is DeepR's regulariser: weight decay must be 0.

After every optimizer step a connection whose weight has crossed zero against its sign dies:
mask 0, weight 0. As many are regrown in the SAME tensor, at random inactive positions other
than those that just died (unless nothing else is free), at exactly 0 with zero momentum. A
regrown connection has no sign yet: it takes the sign of the first non-zero value the optimizer
gives it. Noise and rewiring stop at the schedule's `stop_epoch`; the L1 term stays. Unlike DSR
there is no threshold and no reallocation between layers: sign flips decide what dies.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UserError
from .base import RewireSchedule, Sparsifier
from .budgets import sample_free_positions

# The DSR authors' DeepR temperature for WRN-28-2 on CIFAR-10 (epoch -> T).
PAPER_TEMPERATURE = {0: 1e-5, 25: 1e-8, 80: 1e-12, 140: 1e-15}


class DeepR(Sparsifier):
    method = "deepr"
    granularities = ("element",)

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        temperature: float | dict[int, float] | None = None,
        eta: float = 0.01,
        l1: float = 1e-5,
        **kwargs,
    ):
        if optimizer is None:
            raise ValueError("DeepR needs the optimizer: its terms join the gradient before each step")
        if eta < 0 or l1 < 0:
            raise UserError("deepr: eta and l1 must be >= 0")
        super().__init__(model, optimizer, **kwargs)
        per_epoch = self.schedule.steps_per_epoch
        if temperature is None:  # the paper's annealing where epochs are known, else its first value
            temperature = PAPER_TEMPERATURE if per_epoch else PAPER_TEMPERATURE[0]
        if not isinstance(temperature, dict):
            temperature = {0: temperature}
        self.temperature = {int(e): float(t) for e, t in sorted(temperature.items())}
        if 0 not in self.temperature or any(e < 0 or t < 0 for e, t in self.temperature.items()):
            raise UserError("deepr: temperature needs an entry for epoch 0 and values >= 0")
        if len(self.temperature) > 1 and not per_epoch:
            raise ValueError("DeepR needs the schedule's steps_per_epoch to anneal the temperature by epoch")
        sparse = {id(w) for w in self.weights.values()}
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0) and any(id(p) in sparse for p in group["params"]):
                raise UserError(
                    "deepr: its L1 term is the regulariser, so weight decay must be 0 "
                    f"(train.weight_decay: 0), got {group['weight_decay']}"
                )
        self.eta, self.l1 = eta, l1
        # Rewire after every step, up to the schedule's stop epoch.
        self.schedule = RewireSchedule({0: 1}, self.schedule.stop_epoch, per_epoch)
        # The sign of each active connection: +1, -1, or 0 while a regrown one has not moved yet.
        self.signs = {n: torch.sign(self.weights[n].detach()).to(torch.int8) for n in self.masks}

    def temperature_at(self, iteration: int) -> float:
        """T for optimizer step number `iteration` (1-based)."""
        per_epoch = self.schedule.steps_per_epoch
        epoch = (iteration - 1) // per_epoch if per_epoch else 0
        return [t for start, t in self.temperature.items() if start <= epoch][-1]

    @torch.no_grad()
    def _masked_gradient(self, name: str, weight: torch.Tensor) -> None:
        coming = self.iteration + 1  # the hook runs before this step's step()
        if self.l1:
            weight.grad.add_(torch.sign(weight), alpha=self.l1)
        noise_std = (
            math.sqrt(2 * self.eta * self.temperature_at(coming)) if self.schedule.due(coming) else 0.0
        )
        if noise_std:
            weight.grad.add_(
                torch.randn(weight.shape, generator=self.generator, device=weight.device, dtype=weight.dtype),
                alpha=noise_std,
            )
        super()._masked_gradient(name, weight)  # masked weights get neither term

    @torch.no_grad()
    def reallocate(self) -> dict[str, Any]:
        names = list(self.masks)
        died = []
        for name in names:
            w, m, s = self.weights[name], self.masks[name], self.signs[name]
            current = torch.sign(w).to(torch.int8)
            d = m & (current * s < 0)
            m.logical_and_(~d)
            w.masked_fill_(d, 0.0)
            s.copy_(current * m)  # a regrown weight's first move fixes its sign
            died.append(d)
        self.clear_optimizer_state()  # the dead stop at rest, also those regrown below in this step
        counts = torch.stack([torch.stack([d.sum(), m.sum()]) for d, m in zip(died, self.masks.values())])
        num_died, num_active = map(list, zip(*counts.tolist()))  # the one host sync

        for name, d, count, active in zip(names, died, num_died, num_active):
            if not count:
                continue
            m = self.masks[name]
            free = m.numel() - active
            slots = ~(m | d)
            if free - count < count:  # too few other places: the just-died may come back
                slots, free = ~m, free + count
            else:
                free -= count
            positions = sample_free_positions(slots.view(-1), count, free, self.generator)
            m.view(-1)[positions] = True  # weight 0, sign 0 and momentum 0 already
        return {"iteration": self.iteration, "pruned": sum(num_died), "grown": dict(zip(names, num_died))}

    def _per_tensor_state(self) -> list[dict[str, torch.Tensor]]:
        # The signs are shaped like the weights: a shrink must slice them with their layers, or the
        # next reallocation compares a narrower weight with the full-width signs.
        return [*super()._per_tensor_state(), self.signs]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "signs": {n: s.clone() for n, s in self.signs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, sign in state["signs"].items():
            self.signs[name].copy_(sign)
