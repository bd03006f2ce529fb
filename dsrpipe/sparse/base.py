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

import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .channels import ChannelRemoval, Channels, mean_magnitude
from .cost import model_cost
from .slicing import Cut, cut, dependency_graph, out_channel_handler
from .units import GRANULARITIES, Units, unit_size

DISTRIBUTIONS = ("uniform", "erk")


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


@dataclass(frozen=True)
class LayerSelection:
    """Which Conv2d/Linear weight tensors are sparse.

    By rule: every Conv2d and Linear weight except the first conv (`dense_first`), the classifier
    (`dense_last`) and the modules whose names match an fnmatch pattern of `exclude`. The model
    may declare these (`model.dense_defaults`, set by `dsrpipe.models.create_model`): its first
    conv and classifier by name, and its other dense layers as the default of `exclude` (a WRN's
    shortcut convs, a ResNet's downsample convs); `exclude=None` takes that default, an explicit
    list replaces it. Without declarations: the first Conv2d (an MLP's first Linear is sparse, as
    it holds most of the weights) and the last Linear.

    Or explicitly: `tensors` names the weights to make sparse as `model.named_parameters()` does
    ("layer1.0.conv1.weight", like torch.ao.pruning's `tensor_fqn`); the rule is then unused."""

    dense_first: bool = True
    dense_last: bool = True
    exclude: tuple[str, ...] | None = None
    tensors: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("exclude", "tensors"):  # lists read from YAML become tuples: hashable, immutable
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):
                    raise UserError(f"{name} expects a list of names, got the string '{value}'")
                object.__setattr__(self, name, tuple(value))
        if self.tensors is not None and (
            self.exclude is not None or not self.dense_first or not self.dense_last
        ):
            raise UserError(
                "give either the sparse tensors by name or the rule (dense_first, dense_last, "
                "exclude), not both"
            )

    def select(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The sparse weights, by module name, in model order."""
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if self.tensors is not None:
            by_tensor = {f"{n}.weight": n for n, _ in layers}
            for tensor in self.tensors:
                if tensor not in by_tensor:
                    example = next(iter(by_tensor), "none")
                    raise UserError(
                        f"sparse tensor '{tensor}' is no Conv2d/Linear weight of this model "
                        f"(they are named like '{example}')"
                    )
            chosen = {by_tensor[t] for t in self.tensors}
            return {n: m.weight for n, m in layers if n in chosen}
        declared = getattr(model, "dense_defaults", None)
        convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in layers if isinstance(m, nn.Linear)]
        first = getattr(declared, "first_conv", None) or (convs[0] if convs else None)
        classifier = getattr(declared, "classifier", None) or (linears[-1] if linears else None)
        dense = ({first} if self.dense_first else set()) | ({classifier} if self.dense_last else set())
        patterns = self.exclude if self.exclude is not None else getattr(declared, "dense", ())
        return {
            n: m.weight
            for n, m in layers
            if n not in dense and not any(fnmatch.fnmatchcase(n, p) for p in patterns)
        }


def select_sparse_weights(
    model: nn.Module, layers: LayerSelection | None = None, **rule
) -> dict[str, nn.Parameter]:
    """Conv2d/Linear weights to make sparse, by module name: `layers`, or a LayerSelection made of
    the keywords (`dense_first`, `dense_last`, `exclude`, `tensors`)."""
    if layers is not None and rule:
        raise TypeError("give a LayerSelection or its fields, not both")
    return (layers or LayerSelection(**rule)).select(model)


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


def proportional_split(total: int, weights: list[float], capacity: list[int]) -> list[int]:
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


def split_in_units(
    total: int, weights: list[float], capacity: list[int], sizes: list[int]
) -> list[int] | None:
    """Whole units per tensor, `capacity[i]` at most, of `sizes[i]` elements each, holding exactly
    `total` elements in all, each tensor's share of elements close to proportional to `weights`;
    None when no choice of whole units holds exactly `total`.

    At size 1 everywhere this is `proportional_split`. Otherwise tensor by tensor, largest units
    first: its share of what is left to place (`proportional_split` over it and the tensors after
    it), rounded to the nearest count of units that leaves a remainder the tensors after it can
    still hold exactly (a subset-sum table of the remainders reachable with bounded counts of
    units, in multiples of the sizes' gcd). The smallest units come last and absorb the rounding.
    When the sizes divide one another (3×3 kernels and Linear elements; filters of 288 and 576
    weights) every tensor ends within a unit of its share; sizes that do not (25 and 576) may force
    a tensor further from it to keep the total exact."""
    if total > sum(c * s for c, s in zip(capacity, sizes)):
        return None
    if all(s == 1 for s in sizes):
        return proportional_split(total, weights, capacity)
    step = math.gcd(*sizes)
    if total % step:
        return None
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    # reachable[k][r]: whether r·step elements fit exactly into whole units of the tensors order[k:]
    goal = total // step
    reachable = [np.zeros(goal + 1, dtype=bool) for _ in range(len(order) + 1)]
    reachable[-1][0] = True
    for k in range(len(order) - 1, -1, -1):
        size, left, now = sizes[order[k]] // step, capacity[order[k]], reachable[k + 1].copy()
        piece = 1
        while left > 0 and size <= goal:  # bounded counts as pieces of 1, 2, 4, ... units
            take = min(piece, left)
            if take * size <= goal:
                now[take * size :] |= now[: goal + 1 - take * size].copy()
            left -= take
            piece *= 2
        reachable[k] = now
    if not reachable[0][goal]:
        return None
    units, remaining = [0] * len(sizes), goal
    for k, i in enumerate(order):
        rest = order[k:]
        share = proportional_split(
            remaining * step, [weights[j] for j in rest], [capacity[j] * sizes[j] for j in rest]
        )[0]
        size = sizes[i] // step
        most = min(capacity[i], remaining // size)
        nearest = min(max(round(share / sizes[i]), 0), most)
        for offset in range(most + 1):  # nearest first; one is feasible, as reachable[k][remaining] is
            found = next(
                (
                    n
                    for n in (nearest - offset, nearest + offset)
                    if 0 <= n <= most and reachable[k + 1][remaining - n * size]
                ),
                None,
            )
            if found is not None:
                break
        units[i] = found
        remaining -= found * size
    return units


def active_budget(numel: int, sparsity: float) -> int:
    """How many weights a tensor of `numel` keeps at `sparsity` (at least one): what every sparse
    method keeps in all (whatever its distribution over tensors), and what thin-dense matches."""
    return max(1, round((1 - sparsity) * numel))


def layer_budgets(
    shapes: dict[str, tuple[int, ...]], sparsity: float, distribution: str = "uniform"
) -> dict[str, int]:
    """Active weights per sparse tensor at `sparsity`.

    `uniform`: each tensor keeps `active_budget(numel, sparsity)`. `erk` (Erdős–Rényi-kernel, Evci
    et al. 2020): tensor l gets density ε·Σ(shape_l)/numel_l — for a conv (n_out + n_in + k_h + k_w)
    / (n_out·n_in·k_h·k_w) — with ε chosen so that the total is exactly uniform's total; a tensor
    that this would make denser than 1 is dense, and ε is solved again over the others. Counts
    are rounded by largest remainder, so the budget is met exactly."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    uniform = {n: active_budget(k, sparsity) for n, k in numel.items()}
    if distribution == "uniform" or not shapes:
        return uniform
    if distribution != "erk":
        raise UserError(f"unknown distribution '{distribution}' (known: {', '.join(DISTRIBUTIONS)})")
    budget = sum(uniform.values())
    raw = {n: sum(s) for n, s in shapes.items()}  # ε·raw = the tensor's active count
    dense: set[str] = set()
    while True:
        open_ = [n for n in shapes if n not in dense]
        if not open_:
            break
        eps = (budget - sum(numel[n] for n in dense)) / sum(raw[n] for n in open_)
        full = [n for n in open_ if eps * raw[n] > numel[n]]
        if not full:
            break
        dense.update(full)
    exact = [numel[n] if n in dense else eps * raw[n] for n in shapes]
    return dict(zip(shapes, proportional_split(budget, exact, list(numel.values()))))


def smallest_active(
    weight: torch.Tensor, mask: torch.Tensor, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Bool mask of exactly `count` active entries of smallest magnitude (of `weight`, or of unit
    magnitudes with a unit mask).

    `kthvalue` finds the cut in linear time (no sort); entries tied at the cut are chosen
    uniformly at random so that the count is exact."""
    chosen = torch.zeros_like(mask)
    if count <= 0:
        return chosen
    magnitude = weight.detach().abs().contiguous()  # flat views below; the weight may be channels_last
    cut = magnitude[mask].kthvalue(count).values
    below, at = mask & (magnitude < cut), mask & (magnitude == cut)
    num_below, num_at = torch.stack([below.sum(), at.sum()]).tolist()
    chosen.copy_(below)
    chosen.view(-1)[sample_free_positions(at.view(-1), count - num_below, num_at, generator)] = True
    return chosen


# Logits may move by float rounding only when shrinking: smaller layers sum in another order.
SHRINK_TOLERANCE = 1e-4


def _eval_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(batch).float()
    finally:
        model.train(was_training)


def _slice_optimizer(optimizer: torch.optim.Optimizer, renamed: dict, done: Cut) -> None:
    """Point the optimizer at the parameters a cut made (`renamed`: old → (new, module, name)) and
    slice its per-parameter state (momentum, moments) as the parameters were sliced."""
    for group in optimizer.param_groups:
        group["params"] = [renamed[p][0] if p in renamed else p for p in group["params"]]
    state = defaultdict(dict)
    for param, values in optimizer.state.items():
        if param not in renamed:
            state[param] = values
            continue
        new, module, name = renamed[param]
        state[new] = {
            key: done.apply(module, name, value)
            if torch.is_tensor(value) and value.shape == param.shape
            else value
            for key, value in values.items()
        }
    optimizer.state = state


class Sparsifier:
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
        self.budgets = (
            layer_budgets({n: tuple(w.shape) for n, w in self.weights.items()}, sparsity, distribution)
            if sparsity > 0
            else {}
        )
        if granularity != "element":
            self.budgets = {
                n: max(1, round(b / self.units[n].size)) * self.units[n].size for n, b in self.budgets.items()
            }
        if sparsity > 0:
            for name, w in self.weights.items():
                # Contiguous whatever the weight's memory format: the methods index masks flat.
                self.masks[name] = self.initial_mask(name, w).contiguous()
        if scale_init:
            self.scale_initial_weights()
        if (
            optimizer is not None
            and type(self)._masked_gradient is Sparsifier._masked_gradient
            and self.masks
        ):
            # One fused multiply of all the sparse gradients just before each optimizer step,
            # rather than a hook call per tensor: on a GPU the launches cost more than the math.
            self._hooks = [optimizer.register_step_pre_hook(lambda *_: self._mask_gradients())]
            self._per_weight_hooks = False
        else:
            self._hooks = self._accumulate_hooks()
            self._per_weight_hooks = True  # on the weights themselves, which shrinking replaces
        # Positions grown at the latest reallocation, for the regrowth diagnostic.
        self.last_grown = (
            {n: torch.zeros_like(m) for n, m in self.masks.items()} if self.tracks_regrowth else {}
        )
        self.apply_masks()
        self.channels: Channels | None = None
        self.filled = (
            False  # the live channels made dense (ChannelRemoval.dense_inside): no more reallocation
        )
        if remove_channels is not None:
            self._start_channel_removal(remove_channels, example_inputs)

    def _start_channel_removal(
        self, removal: ChannelRemoval, example_inputs: torch.Tensor | None, score=mean_magnitude
    ) -> None:
        if self.granularity == "channel":
            raise UserError(
                "channel removal takes element or kernel granularity: at channel granularity a "
                "removed input channel would split the filters that read it"
            )
        if self.optimizer is None or example_inputs is None:
            raise ValueError("channel removal needs the optimizer and example_inputs")
        sparse = {n: (self.weights[n], m) for n, m in self.masks.items()}
        self.channels = Channels(self.model, removal, example_inputs, set(self.weights), sparse, score)
        self._channel_hook = self.optimizer.register_step_pre_hook(lambda *_: self.channels.hold_gradients())

    def hold_removed_channels(self, state: dict[str, Any], example_inputs: torch.Tensor) -> None:
        """Keep the channels a trained run removed at zero, removing no more (fine-tuning)."""
        self._start_channel_removal(ChannelRemoval(share=0.0), example_inputs)
        self.channels.load_state_dict(state, self.optimizer)

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

    @torch.no_grad()
    def remove_channels(self) -> dict[str, Any]:
        """Remove the channels due now (channels.py) and regrow the active weights they held in the
        surviving channels, in proportion to what each tensor kept, so the active total stays."""
        channels = self.channels
        last = self.iteration >= channels.removal.end
        chosen = channels.choose_due(self.iteration, self.active_count())
        freed = channels.remove(chosen, self.optimizer)
        if freed:
            names = list(self.masks)
            kept = self.active_per_tensor()
            units = [self.units[n] for n in names]
            free = [self.free_units(n, kept[n] // u.size) for n, u in zip(names, units)]
            grown = split_in_units(freed, [kept[n] for n in names], free, [u.size for u in units])
            if grown is None:
                raise RuntimeError(
                    f"cannot regrow the {freed} weights of the removed channels in whole units"
                )
            for n, u, g, f in zip(names, units, grown, free):
                slots = self.growth_slots(n, u.of(self.masks[n]))
                u.activate(self.masks[n], sample_free_positions(slots.view(-1), g, f, self.generator))
            self.clear_optimizer_state()
        stats = {"channels_removed": sum(len(c) for c in chosen.values()), "channels_regrown": freed}
        # Floors and the budget may leave the share out of reach: said once, at the end, in one line.
        if last and (short := channels.shortfall(self.active_count())):
            stats["short_of_share"] = short
        if channels.removal.shrink and chosen:
            stats["shrunk"] = self.shrink()
        if channels.cost is not None:
            stats[f"{channels.removal.budget.measure}_share"] = channels.cost_share()
        if last and channels.removal.dense_inside:
            stats["filled"] = self.fill_live_channels()
        return stats

    @torch.no_grad()
    def fill_live_channels(self) -> int:
        """Speed first: every weight of the live channels becomes active, starting from zero (as
        grown weights do), and reallocation stops; the model is a dense network of the widths
        removal left. Returns how many weights were switched on."""
        before = self.active_count()
        for name, mask in self.masks.items():
            mask.copy_(~self.channels.closed[name])
        self.apply_masks()
        self.filled = True
        return self.active_count() - before

    def _per_tensor_state(self) -> list[dict[str, torch.Tensor]]:
        """The tensors shaped like a sparse weight, by its name, that shrinking slices with it;
        methods with more extend the list."""
        return [self.masks, self.last_grown]

    @torch.no_grad()
    def shrink(self) -> dict[str, Any]:
        """Cut the removed channels out of the model (slicing.py: the layers, BatchNorm's statistics
        and everything coupled) and slice what rides on its parameters as the layers were: the
        masks, the method's per-tensor state, the optimizer's momentum. The logits and the active
        total stay; the model's parameters are new objects (wrappers such as DDP are rebuilt).
        Returns the iteration and the parameters and MACs (per sample) before and after."""
        channels, model = self.channels, self.model
        probe = torch.randn(2, *channels.example_inputs.shape[1:], generator=torch.Generator().manual_seed(0))
        probe = probe.to(channels.example_inputs.device)
        (params_before, macs_before), expected = model_cost(model, probe), _eval_logits(model, probe)
        before = {(m, n): p for m in model.modules() for n, p in m.named_parameters(recurse=False)}
        graph = dependency_graph(model, channels.example_inputs, "shrinking")
        done = cut(model, graph, [(m, out_channel_handler(m), idxs) for m, idxs in channels.cut_list()])
        renamed = {old: (getattr(m, n), m, n) for (m, n), old in before.items() if getattr(m, n) is not old}
        if probe.device.type == "cuda":  # new parameters come contiguous; cuDNN wants NHWC
            model.to(memory_format=torch.channels_last)
        if self.optimizer is not None:
            _slice_optimizer(self.optimizer, renamed, done)
        modules = dict(model.named_modules())
        for name in self.weights:
            module = modules[name]
            self.weights[name] = module.weight
            self.units[name] = Units(module.weight.shape, self.units[name].size)
            for store in self._per_tensor_state():
                if name in store:
                    store[name] = done.apply(module, "weight", store[name])
        if self._per_weight_hooks:
            for hook in self._hooks:
                hook.remove()
            self._hooks = self._accumulate_hooks()
        try:
            got = _eval_logits(model, probe)
        except RuntimeError:  # a cut that left the layers disagreeing on a width: broken, not changed
            got = None
        scale = max(1.0, float(expected.abs().max()))
        if got is None or not float((got - expected).abs().max()) <= SHRINK_TOLERANCE * scale:
            raise UserError(
                f"shrinking during training {'changed the logits of' if got is not None else 'broke'} "
                f"{type(model).__name__}; train without it (sparsity.remove_channels.shrink: false)"
            )
        channels.cut_out(model, {n: (self.weights[n], m) for n, m in self.masks.items()})
        params_after, macs_after = model_cost(model, probe)
        return {
            "iteration": self.iteration,
            "params_before": params_before,
            "params_after": params_after,
            "macs_before": macs_before,
            "macs_after": macs_after,
        }

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
