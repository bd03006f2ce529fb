"""Sparse training as an optimizer companion, and the static baseline (a fixed random mask).

A sparsifier owns one boolean mask per sparse weight tensor. Masked weights hold exact zeros,
so the forward pass costs nothing extra; a post-accumulate-grad hook zeroes their gradients and
`clear_optimizer_state` zeroes their momentum, so no optimizer step can make them non-zero.

    sparsifier = DSR(model, optimizer, sparsity=0.9, prune_target=20_000)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        sparsifier.step()          # counts iterations, reallocates on schedule

Create the sparsifier after moving the model to its device and before training.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UserError


@dataclass
class RewireSchedule:
    """When to reallocate: `periods` maps a start epoch to the period in iterations from then on
    (the paper: {0: 100, 25: 200, 80: 400, 140: 800}); nothing from `stop_epoch` on."""

    periods: dict[int, int] = field(default_factory=lambda: {0: 100})
    stop_epoch: int | None = None
    steps_per_epoch: int | None = None

    def __post_init__(self):
        self.periods = {int(e): int(p) for e, p in sorted(self.periods.items())}
        if 0 not in self.periods or any(p < 1 for p in self.periods.values()):
            raise ValueError("RewireSchedule.periods needs an entry for epoch 0 and periods >= 1")
        needs_epochs = len(self.periods) > 1 or self.stop_epoch is not None
        if needs_epochs and not self.steps_per_epoch:
            raise ValueError("RewireSchedule needs steps_per_epoch to apply epoch milestones")

    def due(self, iteration: int) -> bool:
        """Whether to reallocate after optimizer step number `iteration` (1-based)."""
        epoch = (iteration - 1) // self.steps_per_epoch if self.steps_per_epoch else 0
        if self.stop_epoch is not None and epoch >= self.stop_epoch:
            return False
        period = [p for start, p in self.periods.items() if start <= epoch][-1]
        return iteration % period == 0


def select_sparse_weights(
    model: nn.Module, *, dense_first: bool = True, dense_last: bool = True, exclude: Iterable[str] = ()
) -> dict[str, nn.Parameter]:
    """Conv2d/Linear weights to make sparse, by module name.

    By default the first conv (few weights, each carrying a lot of input) and the final
    classifier (the last Linear) stay dense, as in the paper; an MLP's first Linear is sparse, as
    it holds most of the weights. `exclude` adds fnmatch patterns on module names."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    dense = set(convs[:1] if dense_first else []) | set(linears[-1:] if dense_last else [])
    patterns = list(exclude)
    chosen = {}
    for name, module in layers:
        if name in dense:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        chosen[name] = module.weight
    return chosen


def sample_free_positions(
    free: torch.Tensor, count: int, num_free: int, generator: torch.Generator
) -> torch.Tensor:
    """`count` distinct flat indices drawn uniformly at random where the flat bool `free` is True.

    Linear in size and without sorting: when free slots are plentiful, draw candidates with
    replacement and keep each slot's first draw (sequential draws that skip repeats are a uniform
    sample without replacement); otherwise permute the few free slots."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=free.device)
    if count > num_free:
        raise ValueError(f"cannot place {count} weights in {num_free} free slots")
    if 4 * count > num_free:
        slots = free.nonzero().squeeze(1)
        return slots[torch.randperm(slots.numel(), generator=generator, device=free.device)[:count]]
    n = free.numel()
    chosen = []
    while count > 0:
        expected_draws = count * n / num_free
        draws = math.ceil(1.25 * expected_draws + 8 * math.sqrt(expected_draws) + 64)
        candidates = torch.randint(n, (draws,), generator=generator, device=free.device)
        order = torch.arange(draws, device=free.device)
        first_draw = torch.empty(n, dtype=torch.long, device=free.device)
        first_draw.scatter_reduce_(0, candidates, order, "amin", include_self=False)
        fresh = free[candidates] & (first_draw[candidates] == order)
        keep = fresh & (fresh.cumsum(0) <= count)
        picked = candidates[keep]
        chosen.append(picked)
        count -= picked.numel()
        if count > 0:  # rare: too many repeats or taken slots among the draws; draw the rest
            free = free.clone()
            free[picked] = False
            num_free -= picked.numel()
    return torch.cat(chosen)


def proportional_split(total: int, weights: list[int], capacity: list[int]) -> list[int]:
    """Integers proportional to `weights`, each within its `capacity`, summing exactly to `total`.

    Rounds by largest remainder; what a full tensor cannot take goes to the others."""
    if total > sum(capacity):
        raise ValueError(f"cannot place {total} weights in {sum(capacity)} free slots")
    share = [0] * len(weights)
    remaining = total
    while remaining > 0:
        open_ = [i for i in range(len(share)) if share[i] < capacity[i]]
        basis = [weights[i] for i in open_]
        if sum(basis) == 0:
            basis = [capacity[i] - share[i] for i in open_]
        exact = [remaining * b / sum(basis) for b in basis]
        quota = [math.floor(q) for q in exact]
        by_remainder = sorted(range(len(open_)), key=lambda k: exact[k] - quota[k], reverse=True)
        for k in by_remainder[: remaining - sum(quota)]:
            quota[k] += 1
        for i, q in zip(open_, quota):
            take = min(q, capacity[i] - share[i])
            share[i] += take
            remaining -= take
    return share


def active_budget(numel: int, sparsity: float) -> int:
    """How many weights a tensor of `numel` keeps at `sparsity` (at least one): the budget every
    sparse method starts from or prunes down to, and that thin-dense matches."""
    return max(1, round((1 - sparsity) * numel))


def smallest_active(weight: torch.Tensor, mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Bool mask of exactly `count` active entries of smallest magnitude.

    `kthvalue` finds the cut in linear time (no sort); entries tied at the cut are chosen
    uniformly at random so that the count is exact."""
    chosen = torch.zeros_like(mask)
    if count <= 0:
        return chosen
    magnitude = weight.detach().abs()
    cut = magnitude[mask].kthvalue(count).values
    below, at = mask & (magnitude < cut), mask & (magnitude == cut)
    num_below, num_at = torch.stack([below.sum(), at.sum()]).tolist()
    chosen.copy_(below)
    chosen.view(-1)[sample_free_positions(at.view(-1), count - num_below, num_at, generator)] = True
    return chosen


class Sparsifier:
    """Static sparse training: each tensor keeps the uniformly random mask it starts with.

    Subclasses override `reallocate()` to move parameters; everything else (masks, zeroed
    gradients and momentum, schedule, checkpoint state, reporting) is shared."""

    method = "static"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float = 0.9,
        dense_first: bool = True,
        dense_last: bool = True,
        exclude: Iterable[str] = (),
        schedule: RewireSchedule | None = None,
        seed: int = 0,
        scale_init: bool = False,
    ):
        if not 0.0 <= sparsity < 1.0:
            raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
        self.model, self.optimizer, self.sparsity = model, optimizer, sparsity
        self.weights = select_sparse_weights(
            model, dense_first=dense_first, dense_last=dense_last, exclude=exclude
        )
        self.schedule = schedule or RewireSchedule()
        self.iteration = 0
        device = next(iter(self.weights.values())).device if self.weights else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.masks: dict[str, torch.Tensor] = {}
        if sparsity > 0:
            for name, w in self.weights.items():
                self.masks[name] = self.initial_mask(name, w)
        if scale_init:
            self.scale_initial_weights()
        self._hooks = [
            self.weights[name].register_post_accumulate_grad_hook(
                lambda weight, name=name: self._masked_gradient(name, weight))
            for name in self.masks
        ]
        self.apply_masks()

    def initial_mask(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The mask a tensor starts with: uniformly random at the target sparsity. Methods that
        start elsewhere (dense, a given mask) override this."""
        active = active_budget(weight.numel(), self.sparsity)
        mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        all_free = torch.ones_like(mask)
        mask[sample_free_positions(all_free, active, weight.numel(), self.generator)] = True
        return mask.view_as(weight)

    @torch.no_grad()
    def scale_initial_weights(self) -> None:
        """Multiply each sparse tensor by 1/sqrt(its density), so that a layer's outputs start with
        the variance its dense initialisation was designed for. Without it, a layer keeping 2% of
        its inputs passes on ~14% of the signal, and a deep stack without normalisation starts
        near-silent (loss stuck at chance for epochs). For a model built from scratch only."""
        for name, mask in self.masks.items():
            density = mask.float().mean()
            self.weights[name].mul_(density.rsqrt())

    def _masked_gradient(self, name: str, weight: torch.Tensor) -> None:
        """The post-accumulate-grad hook: zero the gradient of masked weights. Methods that read
        the dense gradient (RigL) override this to look at it first."""
        weight.grad.mul_(self.masks[name])

    # -- the optimizer-like interface -------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Call once after every `optimizer.step()`; returns reallocation stats when one ran."""
        self.iteration += 1
        if self.masks and self.schedule.due(self.iteration):
            return self.reallocate()
        return None

    def reallocate(self) -> dict[str, Any] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "iteration": self.iteration,
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.method:
            raise UserError(f"checkpoint was trained with method '{state['method']}', not '{self.method}'")
        self.iteration = state["iteration"]
        self.generator.set_state(state["generator"])
        self.load_masks(state["masks"])

    def load_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Adopt masks found elsewhere (a checkpoint, another run) and zero what they mask."""
        if set(masks) != set(self.masks):
            raise UserError("the masks do not match this model's sparse layers")
        for name, mask in masks.items():
            self.masks[name].copy_(mask)  # in place: the gradient hooks hold these tensors
        self.apply_masks()

    def remove(self) -> None:
        """Detach the gradient hooks; the weights keep their zeros."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- helpers for the methods' reallocate() -----------------------------------------------
    def active_per_tensor(self) -> dict[str, int]:
        """Mask ones of each sparse tensor, read in one host sync."""
        return dict(zip(self.masks, torch.stack([m.sum() for m in self.masks.values()]).tolist()))

    @torch.no_grad()
    def drop_smallest(self, name: str, count: int) -> torch.Tensor:
        """Deactivate exactly `count` active weights of tensor `name` with the smallest magnitude
        (mask 0, weight 0); returns which."""
        weight, mask = self.weights[name], self.masks[name]
        dropped = smallest_active(weight, mask, count, self.generator)
        mask.logical_and_(~dropped)
        weight.masked_fill_(dropped, 0.0)
        return dropped

    # -- keeping masked weights at exactly zero ---------------------------------------------
    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self.weights[name].mul_(mask)
        self.clear_optimizer_state()

    @torch.no_grad()
    def clear_optimizer_state(self) -> None:
        """Zero per-weight optimizer state (momentum, Adam moments) where the mask is 0, so that
        pruned weights stay 0 and grown ones start from rest."""
        if self.optimizer is None:
            return
        for name, mask in self.masks.items():
            for value in self.optimizer.state.get(self.weights[name], {}).values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.mul_(mask)

    # -- reporting ----------------------------------------------------------------------------
    @torch.no_grad()
    def layer_density(self) -> dict[str, float]:
        """Active fraction of each sparse-eligible weight tensor: mask ones (a just-grown weight
        is active at value 0), or non-zeros where there is no mask."""
        if not self.weights:
            return {}
        active = [self.masks[n].sum() if self.masks else w.count_nonzero() for n, w in self.weights.items()]
        return {n: a / w.numel() for (n, w), a in zip(self.weights.items(), torch.stack(active).tolist())}

    def active_count(self) -> int:
        """Total mask ones: DSR keeps this constant."""
        return sum(self.active_per_tensor().values()) if self.masks else 0


class Dense(Sparsifier):
    """Ordinary dense training, reported through the same interface."""

    method = "dense"

    def __init__(self, model, optimizer=None, **kwargs):
        kwargs["sparsity"] = 0.0
        super().__init__(model, optimizer, **kwargs)
