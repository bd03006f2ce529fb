"""Rigging the Lottery (RigL; Evci et al., ICML 2020).

Every period, each sparse tensor on its own: drop the fraction `alpha_t` of its active weights
with the smallest magnitude and grow as many where the DENSE gradient (the gradient of the
masked-out weights too, from the minibatch just before the reallocation) is largest, starting
from zero. `alpha_t = alpha/2 · (1 + cos(π t / decay_end_iteration))` decays to 0, after which the
masks stay fixed. Unlike DSR, growth is gradient-guided instead of random, and each tensor keeps
its sparsity (no reallocation between layers).

As in the RigL authors' code (google-research/rigl, `sparse_optimizers.py`: growth scores are
masked only where connections survive the drop, and only connections inactive BEFORE the update
count as new), a position dropped in this very step may be regrown when its dense gradient ranks
high enough; it is then no new connection: it keeps the value it had and its momentum, as if it had
never been dropped. Every genuinely new connection starts at exactly 0, with zero momentum (the
paper's "zero initialisation" of grown connections).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UserError
from .base import Sparsifier
from .budgets import smallest_active


class RigL(Sparsifier):
    method = "rigl"
    granularities = ("element",)
    tracks_regrowth = True

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        alpha: float = 0.3,
        decay_end_iteration: int | None = None,
        total_steps: int | None = None,
        **kwargs,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(model, optimizer, **kwargs)
        self.alpha = alpha
        if decay_end_iteration is None:  # the schedule's stop, else the whole run; None: alpha stays constant
            stop, per_epoch = self.schedule.stop_epoch, self.schedule.steps_per_epoch
            decay_end_iteration = stop * per_epoch if stop is not None and per_epoch else total_steps
        self.end_iteration = decay_end_iteration
        self._dense_grad: dict[str, torch.Tensor] = {}

    def drop_fraction(self, iteration: int) -> float:
        if self.end_iteration is None:
            return self.alpha
        if iteration >= self.end_iteration:
            return 0.0
        return self.alpha / 2 * (1 + math.cos(math.pi * iteration / self.end_iteration))

    def _masked_gradient(self, name: str, weight: torch.Tensor) -> None:
        # Keep |dense gradient| only when the coming step() reallocates (the hook runs before it).
        coming = self.iteration + 1
        if self.schedule.due(coming) and self.drop_fraction(coming) > 0:
            self._dense_grad[name] = weight.grad.detach().abs()  # a new tensor; the mask below is in place
        super()._masked_gradient(name, weight)

    @torch.no_grad()
    def reallocate(self) -> dict[str, Any] | None:
        fraction = self.drop_fraction(self.iteration)
        scores, self._dense_grad = self._dense_grad, {}
        if fraction == 0.0:
            return None
        if set(scores) != set(self.masks):
            raise RuntimeError(
                "RigL reallocates from the dense gradient of the step just before: "
                "call backward() and then step() on a reallocation iteration"
            )
        grown = {}
        for name, num_active in self.active_per_tensor().items():
            w, m = self.weights[name], self.masks[name]
            count = round(fraction * num_active)
            # 1. Drop exactly `count` smallest-magnitude active weights; 2. grow as many where
            #    |dense gradient| is largest among all positions not kept (scores are >= 0, so -1
            #    rules the kept ones out); the just-dropped are candidates too.
            dropped = smallest_active(w, m, count, self.generator)
            kept = m & ~dropped
            grow = torch.zeros_like(m)
            if count:
                score = scores[name].masked_fill(kept, -1.0)
                grow.view(-1)[score.view(-1).topk(count, sorted=False).indices] = True
            m.copy_(kept | grow)
            w.masked_fill_(dropped & ~grow, 0.0)  # a regrown just-dropped weight keeps its value
            grown[name] = count
        self.clear_optimizer_state()  # the dropped lose their momentum; new ones never had any
        return {
            "iteration": self.iteration,
            "drop_fraction": fraction,
            "pruned": sum(grown.values()),
            "grown": grown,
        }
