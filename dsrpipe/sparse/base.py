"""Sparse training as an optimizer companion, and the static baseline (a fixed random mask).

A sparsifier owns one boolean mask per sparse weight tensor. Masked weights hold exact zeros,
so the forward pass costs nothing extra; their gradients are zeroed just before each optimizer
step (one fused multiply, in an optimizer step pre-hook; as each gradient accumulates when no
optimizer is given or a method reads the dense gradient) and `clear_optimizer_state` zeroes their
momentum, so no optimizer step can make them non-zero.

    sparsifier = DSR(model, optimizer, sparsity=0.9, prune_target=20_000)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        sparsifier.step()          # counts iterations, reallocates on schedule

Create the sparsifier after moving the model to its device and before training. Every method
takes its own keyword options; an option it does not know is a TypeError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .budgets import DISTRIBUTIONS, layer_budgets, sample_free_positions, smallest_active
from .channel_steps import ChannelSteps
from .channels import Channels
from .layers import LayerSelection
from .removal import ChannelRemoval
from .units import GRANULARITIES, Units, unit_size


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


class Sparsifier(ChannelSteps):
    """Static sparse training: each tensor keeps the random mask it starts with.

    Subclasses override `reallocate()` to move parameters; everything else (masks, zeroed
    gradients and momentum, schedule, checkpoint state, reporting) is shared.

    Options every method shares: `sparsity` (of the sparse tensors), `layers` (which tensors are
    sparse: a LayerSelection; default: the model's declared dense layers), `distribution` of the
    active weights over tensors (`uniform`: every tensor at `sparsity`; `erk`: Erdős–Rényi-kernel,
    see `layer_budgets`), `schedule` (when to reallocate), `seed` (masks and growth),
    `scale_init` (start each sparse tensor at 1/sqrt(its density) of its dense init) and, for the
    methods that support it (`granularities`), `granularity`: what is pruned and grown as one unit
    (see units.py). At kernel or channel granularity each tensor's budget is rounded to whole
    units (at least one) and its masks are always unions of whole units."""

    method = "static"
    granularities = GRANULARITIES  # methods that move single weights only narrow this to ("element",)
    # Whether reallocation grows connections, so that the share of pruned weights that had been
    # grown at the previous reallocation is worth measuring (see `step`).
    tracks_regrowth = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        sparsity: float = 0.9,
        layers: LayerSelection | None = None,
        distribution: str = "uniform",
        schedule: RewireSchedule | None = None,
        seed: int = 0,
        scale_init: bool = False,
        granularity: str = "element",
        remove_channels: ChannelRemoval | None = None,
        example_inputs: torch.Tensor | None = None,
    ):
        self._check_options(sparsity, distribution, granularity)
        self.granularity = granularity
        self.model, self.optimizer, self.sparsity = model, optimizer, sparsity
        self.layers = layers or LayerSelection()
        self.distribution = distribution
        self.weights = self.layers.select(model)
        self.units = {
            n: Units(w.shape, unit_size(tuple(w.shape), granularity)) for n, w in self.weights.items()
        }
        self.schedule = schedule or RewireSchedule()
        self.iteration = 0
        device = next(iter(self.weights.values())).device if self.weights else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.masks: dict[str, torch.Tensor] = {}
        # The active count each sparse tensor starts with (or, pruning, ends with).
        self.budgets = self._initial_budgets()
        self._draw_initial_masks()
        if scale_init:
            self.scale_initial_weights()
        self._install_gradient_hooks()
        # Positions grown at the latest reallocation, for the regrowth diagnostic.
        self.last_grown = (
            {n: torch.zeros_like(m) for n, m in self.masks.items()} if self.tracks_regrowth else {}
        )
        self.apply_masks()
        self.channels: Channels | None = None
        # The live channels made dense (ChannelRemoval.dense_inside): no more reallocation.
        self.filled = False
        if remove_channels is not None:
            self._start_channel_removal(remove_channels, example_inputs)

    def _check_options(self, sparsity: float, distribution: str, granularity: str) -> None:
        """The shared options this method can take, or a one-line UserError."""
        if not 0.0 <= sparsity < 1.0:
            raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
        if distribution not in DISTRIBUTIONS:
            raise UserError(f"unknown distribution '{distribution}' (known: {', '.join(DISTRIBUTIONS)})")
        if granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity '{granularity}' (known: {', '.join(GRANULARITIES)})")
        if granularity not in self.granularities:
            raise UserError(
                f"method '{self.method}' prunes and grows single weights only: granularity "
                f"'{granularity}' is for static, dsr and set"
            )

    def _initial_budgets(self) -> dict[str, int]:
        """Each sparse tensor's active count at the sparsity and distribution (none at sparsity 0);
        at kernel or channel granularity rounded to whole units, at least one."""
        if not self.sparsity > 0:
            return {}
        shapes = {n: tuple(w.shape) for n, w in self.weights.items()}
        budgets = layer_budgets(shapes, self.sparsity, self.distribution)
        if self.granularity == "element":
            return budgets
        return {n: max(1, round(b / self.units[n].size)) * self.units[n].size for n, b in budgets.items()}

    def _draw_initial_masks(self) -> None:
        """Every sparse tensor's starting mask (`initial_mask`); none at sparsity 0: nothing is masked."""
        if self.sparsity > 0:
            for name, w in self.weights.items():
                # Contiguous whatever the weight's memory format: the methods index masks flat.
                self.masks[name] = self.initial_mask(name, w).contiguous()

    def _install_gradient_hooks(self) -> None:
        """What zeroes the masked weights' gradients: one optimizer step pre-hook where that is all
        there is to do, else a hook per weight as its gradient accumulates (no optimizer, or a
        method that reads the dense gradient first)."""
        if (
            self.optimizer is not None
            and type(self)._masked_gradient is Sparsifier._masked_gradient
            and self.masks
        ):
            # One fused multiply of all the sparse gradients just before each optimizer step,
            # rather than a hook call per tensor: on a GPU the launches cost more than the math.
            self._hooks = [self.optimizer.register_step_pre_hook(lambda *_: self._mask_gradients())]
            self._per_weight_hooks = False
        else:
            self._hooks = self._accumulate_hooks()
            self._per_weight_hooks = True  # on the weights themselves, which shrinking replaces

    def initial_mask(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The mask a tensor starts with: its budget of units, uniformly at random. Methods that
        start elsewhere (dense, a given mask) override this."""
        units = self.units[name]
        active = self.budgets[name] // units.size
        mask = torch.zeros(units.count, dtype=torch.bool, device=weight.device)
        all_free = torch.ones_like(mask)
        mask[sample_free_positions(all_free, active, units.count, self.generator)] = True
        return units.expand(mask).view_as(weight)

    @torch.no_grad()
    def scale_initial_weights(self) -> None:
        """Multiply each sparse tensor by 1/sqrt(its density), so that a layer's outputs start with
        the variance its dense initialisation was designed for. Without it, a layer keeping 2% of
        its inputs passes on ~14% of the signal, and a deep stack without normalisation starts
        near-silent (loss stuck at chance for epochs). For a model built from scratch only."""
        for name, mask in self.masks.items():
            density = mask.float().mean()
            self.weights[name].mul_(density.rsqrt())

    def _accumulate_hooks(self) -> list:
        return [
            self.weights[name].register_post_accumulate_grad_hook(
                lambda weight, name=name: self._masked_gradient(name, weight)
            )
            for name in self.masks
        ]

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        """The optimizer's step pre-hook: zero the gradient of every masked weight at once."""
        pairs = [(self.weights[n].grad, m) for n, m in self.masks.items() if self.weights[n].grad is not None]
        if pairs:
            grads, masks = zip(*pairs)
            torch._foreach_mul_(list(grads), list(masks))

    def _masked_gradient(self, name: str, weight: torch.Tensor) -> None:
        """The post-accumulate-grad hook: zero the gradient of masked weights. Methods that read
        the dense gradient (RigL) override this to look at it first."""
        weight.grad.mul_(self.masks[name])

    def defer_gradient_hooks(self) -> None:
        """Do each tensor's gradient work (the masking, and what a method reads or adds: RigL's
        dense gradient, DeepR's L1 term and noise) just before the optimizer step rather than as
        the gradient accumulates. DistributedDataParallel needs this: it averages the gradients
        over the processes after they accumulate, so an accumulate hook would see, and change,
        this process's share alone; at step time every process holds the same averaged gradient."""
        if self.optimizer is None:
            raise ValueError("deferring the gradient hooks needs the optimizer")
        if type(self)._masked_gradient is Sparsifier._masked_gradient:
            return  # masking alone already runs at step time
        for hook in self._hooks:
            hook.remove()
        self._hooks = [self.optimizer.register_step_pre_hook(lambda *_: self._gradients_at_step())]
        self._per_weight_hooks = False

    @torch.no_grad()
    def _gradients_at_step(self) -> None:
        for name in self.masks:
            weight = self.weights[name]
            if weight.grad is not None:
                self._masked_gradient(name, weight)

    # -- the optimizer-like interface -------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Call once after every `optimizer.step()`; returns reallocation stats when one ran.

        For methods that grow connections the stats also count, of the weights switched off
        (`switched_off`), those that had been switched on at the previous reallocation
        (`pruned_grown`): the DSR authors' check of whether reallocation explores or keeps pruning
        the zeros it has just grown."""
        self.iteration += 1
        due = self.schedule.due(self.iteration)
        scheduled = bool(self.masks) and due and not self.filled
        removing = (
            self.channels is not None
            and self.channels.removal.removes
            and self.channels.removal.due(self.iteration, due)
        )
        stats = self._reallocate_and_track() if scheduled else None
        if removing:
            stats = {**(stats or {"iteration": self.iteration, "pruned": 0}), **self.remove_channels()}
        return stats

    def _reallocate_and_track(self) -> dict[str, Any] | None:
        if not self.tracks_regrowth:
            return self.reallocate()
        before = {n: m.clone() for n, m in self.masks.items()}
        stats = self.reallocate()
        if stats is not None:
            counts = []
            for name, mask in self.masks.items():
                off = before[name] & ~mask
                counts.append(torch.stack([off.sum(), (off & self.last_grown[name]).sum()]))
                self.last_grown[name] = mask & ~before[name]
            stats["switched_off"], stats["pruned_grown"] = torch.stack(counts).sum(0).tolist()
        return stats

    def reallocate(self) -> dict[str, Any] | None:
        return None

    def growth_slots(self, name: str, taken: torch.Tensor) -> torch.Tensor:
        """The units of tensor `name` where growth may go: not `taken` (a unit mask) and not in a
        removed channel."""
        if self.channels is None:
            return ~taken
        return ~(taken | self.units[name].of(self.channels.closed[name]))

    def free_units(self, name: str, active_units: int) -> int:
        """How many units of tensor `name` growth may use, given its active units."""
        closed = self.channels.closed_count[name] if self.channels is not None else 0
        return self.units[name].count - active_units - closed // self.units[name].size

    def state_dict(self) -> dict[str, Any]:
        state = {
            "method": self.method,
            "granularity": self.granularity,
            "iteration": self.iteration,
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "generator": self.generator.get_state(),
        }
        if self.tracks_regrowth:
            state["last_grown"] = {n: g.clone() for n, g in self.last_grown.items()}
        if self.channels is not None:
            state["channels"] = self.channels.state_dict()
            state["shrunk"] = self.channels.shrunk
        if self.filled:
            state["filled"] = True
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.method:
            raise UserError(f"checkpoint was trained with method '{state['method']}', not '{self.method}'")
        # Checkpoints from before granularity were elementwise
        granularity = state.get("granularity", "element")
        if granularity != self.granularity:
            raise UserError(
                f"checkpoint was trained at granularity '{granularity}', not '{self.granularity}'"
            )
        self.iteration = state["iteration"]
        self.generator.set_state(state["generator"])
        if ("channels" in state) != (self.channels is not None):
            raise UserError(
                "checkpoint was trained "
                + ("with" if "channels" in state else "without")
                + " channel removal (sparsity.remove_channels), unlike this run"
            )
        if self.channels is not None:  # first: a shrunk run's masks fit the shrunk model only
            self.channels.load_state_dict(state["channels"], self.optimizer)
            if state.get("shrunk", False):
                self.shrink()
        self.load_masks(state["masks"])
        self.filled = state.get("filled", False)
        for name, grown in state.get("last_grown", {}).items():
            self.last_grown[name] = grown.to(self.masks[name].device).clone()

    def load_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Adopt masks found elsewhere (a checkpoint, another run) and zero what they mask."""
        if set(masks) != set(self.masks):
            raise UserError("the masks do not match this model's sparse layers")
        for name, mask in masks.items():
            if mask.shape != self.masks[name].shape or not self.units[name].whole(mask):
                raise UserError(
                    f"the mask of '{name}' does not fit its weight at granularity '{self.granularity}' "
                    f"(shape {tuple(mask.shape)}, whole units of {self.units[name].size} weights)"
                )
        for name, mask in masks.items():
            self.masks[name].copy_(mask)  # in place: the gradient hooks hold these tensors
        self.apply_masks()

    def remove(self) -> None:
        """Detach the gradient hooks; the weights keep their zeros."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.channels is not None:
            self._channel_hook.remove()

    # -- helpers for the methods' reallocate() -----------------------------------------------
    def active_per_tensor(self) -> dict[str, int]:
        """Mask ones of each sparse tensor, read in one host sync."""
        return dict(zip(self.masks, torch.stack([m.sum() for m in self.masks.values()]).tolist()))

    @torch.no_grad()
    def drop_smallest(self, name: str, count: int) -> torch.Tensor:
        """Deactivate exactly `count` active units of tensor `name` with the smallest magnitude
        (mask 0, weights 0); returns which weights (an elementwise mask)."""
        weight, mask, units = self.weights[name], self.masks[name], self.units[name]
        if units.size == 1:
            dropped = smallest_active(weight, mask, count, self.generator)
        else:
            dropped = units.expand(
                smallest_active(units.magnitude(weight), units.of(mask), count, self.generator)
            )
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

    def checked_state(self) -> dict[str, torch.Tensor]:
        """What every rank must hold alike after a reallocation: the masks, and the live channels."""
        if self.channels is None:
            return self.masks
        return {**self.masks, **{f"channels:{n}": a for n, a in self.channels.alive.items()}}

    def active_count(self) -> int:
        """Total mask ones: DSR keeps this constant."""
        return sum(self.active_per_tensor().values()) if self.masks else 0


class Dense(Sparsifier):
    """Ordinary dense training, reported through the same interface (`layers`: whose density the
    reports show)."""

    method = "dense"
    granularities = ("element",)

    def __init__(self, model, optimizer=None, *, layers: LayerSelection | None = None, seed: int = 0):
        super().__init__(model, optimizer, sparsity=0.0, layers=layers, seed=seed)
