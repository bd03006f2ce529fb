"""Gradual magnitude pruning (Zhu & Gupta, 2017): from scratch (`gmp`), and from a trained dense
model (`prune`, the DSR paper's "compressed sparse" baseline).

Both start DENSE (every mask all ones) and, between `begin_iteration` and `end_iteration`, raise
each tensor's sparsity along the cubic
    s_t = s_f + (s_i - s_f) · (1 - (t - t0) / (n Δt))³,   s_i = 0, s_f = the tensor's final sparsity,
pruning its smallest-magnitude active weights down to it (exact counts). At `end_iteration`
every tensor holds exactly its budget — the count every sparse method starts with — and from
then on the masks are fixed and training fine-tunes the survivors. Nothing ever regrows.

`gmp` prunes on the rewire schedule and ends at 75% of training by default: a sparse model
trained within the same epochs as DSR, but dense at first, so it costs more.
`prune` loads a finished dense run's final weights (`prune_from`) and prunes in `steps` equal
steps (the paper: 20, every 2 epochs), ending at 80% of its own training by default (the paper:
40 of 50 epochs, then 10 epochs of fine-tuning).

`prune-channels` is what a deployer would otherwise do for speed: structured pruning of a trained
dense model. It loads a dense run like `prune`, and removes whole channel groups (channels.py) in
`steps` equal steps, ranked globally by Torch-Pruning's group importance (the L2 magnitude of
every layer a channel occupies, each group's scores over their mean), to the same channel share
as a DSR run with channel removal; the weights stay dense. Then it fine-tunes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp

from ..checkpoint import read_finished_run
from ..errors import UserError
from .base import Sparsifier
from .cost import CostBudget
from .groups import ChannelGroup
from .removal import ChannelRemoval


class GradualPrune(Sparsifier):
    method = "gmp"
    granularities = ("element",)  # prune inherits this
    default_end = 0.75  # of training, when end_iteration is not given

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        begin_iteration: int = 0,
        end_iteration: int | None = None,
        total_steps: int | None = None,
        steps: int | None = None,
        **kwargs,
    ):
        super().__init__(model, optimizer, **kwargs)
        if end_iteration is None:
            if total_steps is None:
                raise ValueError("gradual pruning needs end_iteration or total_steps")
            end_iteration = round(self.default_end * total_steps)  # then fine-tune the rest
        if not 0 <= begin_iteration < end_iteration:
            raise UserError(
                f"gradual pruning needs 0 <= begin_iteration < end_iteration, got {begin_iteration}, {end_iteration}"
            )
        if total_steps is not None and end_iteration > total_steps:
            raise UserError(
                f"gradual pruning ends at iteration {end_iteration}, after training ({total_steps} "
                "iterations): it would never reach the target sparsity"
            )
        if steps is not None and not 1 <= steps <= end_iteration - begin_iteration:
            raise UserError(
                f"gradual pruning needs 1 <= steps <= {end_iteration - begin_iteration} (its iterations), got {steps}"
            )
        self.begin_iteration, self.end_iteration = begin_iteration, end_iteration
        span = end_iteration - begin_iteration
        # With `steps`, prune at n evenly spaced iterations, the last at the end; else on the schedule.
        self.prune_at = (
            {begin_iteration + round(k * span / steps) for k in range(1, steps + 1)} if steps else None
        )

    def initial_mask(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(weight, dtype=torch.bool)  # start dense

    def progress(self, iteration: int) -> float:
        """1 - (1 - p)³ of the cubic, p the fraction of the pruning span done (0 before, 1 after)."""
        p = min(
            max((iteration - self.begin_iteration) / (self.end_iteration - self.begin_iteration), 0.0), 1.0
        )
        return 1 - (1 - p) ** 3

    def target_sparsity(self, iteration: int) -> float:
        """The overall s_t (uniform distribution; each tensor follows its own budget)."""
        return self.sparsity * self.progress(iteration)

    def target_active(self, name: str, iteration: int) -> int:
        numel = self.masks[name].numel()
        return numel - round((numel - self.budgets[name]) * self.progress(iteration))

    def step(self) -> dict[str, Any] | None:
        self.iteration += 1
        t = self.iteration
        if not self.masks or not self.begin_iteration < t <= self.end_iteration:
            return None
        due = (
            t in self.prune_at
            if self.prune_at is not None
            else (t == self.end_iteration or self.schedule.due(t))
        )
        return self.reallocate() if due else None

    @torch.no_grad()
    def reallocate(self) -> dict[str, Any]:
        pruned = {}
        for name, num_active in self.active_per_tensor().items():
            count = max(0, num_active - self.target_active(name, self.iteration))
            self.drop_smallest(name, count)
            pruned[name] = count
        self.clear_optimizer_state()
        return {
            "iteration": self.iteration,
            "target_sparsity": self.target_sparsity(self.iteration),
            "pruned": sum(pruned.values()),
            "pruned_per_tensor": pruned,
        }


class Prune(GradualPrune):
    """Compressed sparse: gradual pruning of a trained dense model, then fine-tuning."""

    method = "prune"
    default_end = 0.8

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        prune_from: str | Path | None = None,
        steps: int = 20,
        begin_iteration: int = 0,
        end_iteration: int | None = None,
        total_steps: int | None = None,
        sparsity: float = 0.9,
        layers=None,
        distribution: str = "uniform",
        seed: int = 0,
    ):
        load_dense_run(model, prune_from, self.method)  # before the masks: they start all ones anyway
        super().__init__(
            model,
            optimizer,
            begin_iteration=begin_iteration,
            end_iteration=end_iteration,
            total_steps=total_steps,
            steps=steps,
            sparsity=sparsity,
            layers=layers,
            distribution=distribution,
            seed=seed,
        )


def load_dense_run(model: torch.nn.Module, prune_from: str | Path | None, method: str) -> None:
    """Load the final weights of a finished dense run into `model`."""
    if prune_from is None:
        raise UserError(f"method '{method}' needs prune_from: the train/final.pt of a dense run to prune")
    source = read_finished_run(prune_from, "prune_from")
    if source["sparsifier"]["masks"] or "channels" in source["sparsifier"]:
        raise UserError(
            f"prune_from: {prune_from} is a sparse run ({source['sparsifier'].get('method')}); "
            f"{method} starts from a dense one"
        )
    state = model.state_dict()
    weights = source["model"]
    if set(weights) != set(state) or any(weights[k].shape != state[k].shape for k in state):
        raise UserError(f"prune_from: {prune_from} holds another model's weights (same model and options?)")
    model.load_state_dict(weights)


def group_importance(group: ChannelGroup) -> torch.Tensor:
    """Torch-Pruning's GroupMagnitudeImportance of each channel of a group."""
    return tp.importance.GroupMagnitudeImportance(p=2)(group.tp_group).detach().double().cpu()


class ChannelPrune(Sparsifier):
    """Structured pruning of a trained dense model: channels removed in equal steps, then fine-tuning."""

    method = "prune-channels"
    granularities = ("element",)
    default_end = 0.5  # of training: the steps, each followed by some training, then fine-tuning

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        prune_from: str | Path | None = None,
        share: float = 0.5,
        steps: int = 5,
        floor: float = 0.1,
        dense_layers: bool = True,
        multiple_of: int = 16,
        shrink: bool = True,
        budget: CostBudget | None = None,
        begin_iteration: int = 0,
        end_iteration: int | None = None,
        total_steps: int | None = None,
        layers=None,
        seed: int = 0,
        example_inputs: torch.Tensor | None = None,
    ):
        load_dense_run(model, prune_from, self.method)
        super().__init__(model, optimizer, sparsity=0.0, layers=layers, seed=seed)
        if end_iteration is None:
            if total_steps is None:
                raise ValueError("channel pruning needs end_iteration or total_steps")
            end_iteration = max(begin_iteration + 1, round(self.default_end * total_steps))
        removal = ChannelRemoval(
            share,
            begin_iteration,
            end_iteration,
            floor=floor,
            steps=steps,
            dense_layers=dense_layers,
            multiple_of=multiple_of,
            shrink=shrink,
            budget=budget,
        )
        self._start_channel_removal(removal, example_inputs, score=group_importance)
