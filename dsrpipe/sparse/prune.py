"""Gradual magnitude pruning ("compressed sparse" in the DSR paper; Zhu & Gupta, 2017).

Starts DENSE (every mask all ones) and, on the reallocation schedule between `begin_iteration`
and `end_iteration`, raises the target sparsity along a cubic,
    s_t = s_f + (s_i - s_f) · (1 - (t - t0) / (n Δt))³,   s_i = 0, s_f = `sparsity`,
pruning each tensor's smallest-magnitude active weights down to it (exact per-tensor counts).
At `end_iteration` every tensor has exactly the final sparsity; from then on the masks are fixed
and training fine-tunes the survivors. Unlike DSR nothing ever regrows, and training is dense at
first, so it costs more than sparse-from-scratch methods.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from .base import Sparsifier, active_budget


class GradualPrune(Sparsifier):
    method = "prune"

    def __init__(self, model, optimizer=None, *, begin_iteration: int = 0, end_iteration: int | None = None,
                 total_steps: int | None = None, **kwargs):
        super().__init__(model, optimizer, **kwargs)
        if end_iteration is None:
            if total_steps is None:
                raise ValueError("gradual pruning needs end_iteration or total_steps")
            end_iteration = round(0.75 * total_steps)  # then fine-tune the last quarter
        if not 0 <= begin_iteration < end_iteration:
            raise UserError(f"gradual pruning needs 0 <= begin_iteration < end_iteration, got {begin_iteration}, {end_iteration}")
        if total_steps is not None and end_iteration > total_steps:
            raise UserError(f"gradual pruning ends at iteration {end_iteration}, after training ({total_steps} "
                            "iterations): it would never reach the target sparsity")
        self.begin_iteration, self.end_iteration = begin_iteration, end_iteration

    def initial_mask(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(weight, dtype=torch.bool)  # start dense

    def target_sparsity(self, iteration: int) -> float:
        """s_t of the cubic schedule (0 before it begins, the final sparsity from its end)."""
        progress = min(max((iteration - self.begin_iteration) / (self.end_iteration - self.begin_iteration), 0.0), 1.0)
        return self.sparsity * (1 - (1 - progress) ** 3)

    def target_active(self, numel: int, iteration: int) -> int:
        # At the end this is the count every sparse method starts with: the same budget.
        return active_budget(numel, self.target_sparsity(iteration))

    def step(self) -> dict[str, Any] | None:
        self.iteration += 1
        t = self.iteration
        if self.masks and self.begin_iteration < t <= self.end_iteration and (
                t == self.end_iteration or self.schedule.due(t)):
            return self.reallocate()
        return None

    @torch.no_grad()
    def reallocate(self) -> dict[str, Any]:
        pruned = {}
        for name, num_active in self.active_per_tensor().items():
            count = max(0, num_active - self.target_active(self.masks[name].numel(), self.iteration))
            self.drop_smallest(name, count)
            pruned[name] = count
        self.clear_optimizer_state()
        return {"iteration": self.iteration, "target_sparsity": self.target_sparsity(self.iteration),
                "pruned": sum(pruned.values()), "pruned_per_tensor": pruned}
