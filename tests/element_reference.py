"""A plain, slow, obviously correct reference of element-level static sparse training, DSR
(Algorithm 1 of ../shared/docs/dsr-algorithm.md) and SET, written without the engine's
machinery: no units, no subset-sum splits, no fused hooks, exact fractions for the growth shares.

It shares one primitive with the engine: `sample_free_positions`, which turns a generator's
draws into distinct random free positions. Random choices can only agree if both sides draw them
the same way; the primitive's own uniformity and distinctness are tested on their own
(tests/test_sparse.py). Everything the algorithm decides around it is written here from scratch.

`lockstep` trains the engine's model and the reference's copy side by side on the same batches, in
the same process, so that the comparison holds on any CPU: no expectation is recorded anywhere.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from dsrpipe.sparse import RewireSchedule, create_sparsifier
from dsrpipe.sparse.budgets import sample_free_positions

SPARSITY, SEED, PERIOD = 0.9, 3, 4
RUNS = {"static": {}, "dsr": {"prune_target": 150, "init_threshold": 0.01}, "set": {"prune_fraction": 0.1}}


class Reference:
    """Masks over every Conv2d/Linear weight except the first conv and the last Linear."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, method: str, **options):
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.weights = [m.weight for m in layers[1:-1]]
        self.optimizer, self.method, self.options = optimizer, method, options
        self.generator = torch.Generator().manual_seed(SEED)
        self.threshold = options.get("init_threshold")
        self.iteration = 0
        self.masks = []
        for w in self.weights:
            keep = max(1, round((1 - SPARSITY) * w.numel()))
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            everywhere = torch.ones(w.numel(), dtype=torch.bool)
            mask[sample_free_positions(everywhere, keep, w.numel(), self.generator)] = True
            self.masks.append(mask.view_as(w))
        with torch.no_grad():
            for w, m in zip(self.weights, self.masks):
                w[~m] = 0.0

    def mask_gradients(self) -> None:
        for w, m in zip(self.weights, self.masks):
            w.grad[~m] = 0.0

    @torch.no_grad()
    def step(self) -> None:
        self.iteration += 1
        if self.iteration % PERIOD or self.method == "static":
            return
        if self.method == "dsr":
            self.dsr()
        else:
            self.set()

    def switch_off(self, i: int, positions: torch.Tensor) -> None:
        self.masks[i][positions] = False
        self.weights[i][positions] = 0.0
        momentum = self.optimizer.state[self.weights[i]]["momentum_buffer"]
        momentum[positions] = 0.0

    def grow(self, i: int, count: int, not_these: torch.Tensor) -> None:
        """`count` random inactive positions, not in `not_these` unless too few others are free.
        They start at 0: inactive weights and their momentum are 0."""
        slots = ~self.masks[i] & ~not_these
        if slots.sum() < count:
            slots = ~self.masks[i]
        picked = sample_free_positions(slots.view(-1), count, int(slots.sum()), self.generator)
        self.masks[i].view(-1)[picked] = True

    def dsr(self) -> None:
        before = [m.clone() for m in self.masks]
        pruned = []
        for i, (w, m) in enumerate(zip(self.weights, self.masks)):
            below = m & (w.abs() < self.threshold)  # 1. prune active weights below H
            if below.sum() == m.sum():  # ...but never a whole tensor: keep its largest weight
                below.view(-1)[(w.abs() * m).argmax()] = False
            self.switch_off(i, below)
            pruned.append(int(below.sum()))
        total = sum(pruned)
        target, tolerance = self.options["prune_target"], 0.1
        if total < (1 - tolerance) * target:  # 2. adapt H
            self.threshold *= 2
        elif total > (1 + tolerance) * target:
            self.threshold /= 2
        kept = [int(m.sum()) for m in self.masks]  # 3. regrow K in proportion to what each kept
        free = [int((~b).sum()) for b in before]
        if total > sum(free):  # free slots are scarce: the just-pruned positions may regrow
            free = [int((~m).sum()) for m in self.masks]
        for i, count in enumerate(largest_remainder(total, kept, free)):
            self.grow(i, count, not_these=before[i])

    def set(self) -> None:
        zeta = self.options["prune_fraction"]
        for i, (w, m) in enumerate(zip(self.weights, self.masks)):
            before = m.clone()
            count = round(zeta * int(m.sum()))
            magnitudes = sorted(w.abs()[m].tolist())
            if count:  # exactly `count` smallest: all below the cut, and random ties at it
                cut = magnitudes[count - 1]
                below, at = m & (w.abs() < cut), m & (w.abs() == cut)
                ties = sample_free_positions(
                    at.view(-1), count - int(below.sum()), int(at.sum()), self.generator
                )
                below.view(-1)[ties] = True
                self.switch_off(i, below)
            self.grow(i, count, not_these=before)


def largest_remainder(total: int, weights: list[int], capacity: list[int]) -> list[int]:
    """Whole shares of `total` proportional to `weights`, by largest remainder (the earlier
    tensor first on a tie), never above `capacity`; what a full tensor cannot take is shared
    again among the others."""
    share = [0] * len(weights)
    while total > sum(share):
        left = total - sum(share)
        open_ = [i for i in range(len(weights)) if share[i] < capacity[i]]
        basis = sum(weights[i] for i in open_)
        exact = {i: Fraction(left * weights[i], basis) for i in open_}
        quota = {i: int(exact[i]) for i in open_}
        for i in sorted(open_, key=lambda i: -(exact[i] - quota[i]))[: left - sum(quota.values())]:
            quota[i] += 1
        for i in open_:
            share[i] += min(quota[i], capacity[i] - share[i])
    return share


def lockstep(method: str, train, model: nn.Module, on_step) -> None:
    """One epoch of the engine's `method` on `model` and of the reference on a copy of it, batch by
    batch; `on_step(engine_sparsifier, reference)` after every step."""
    twin = copy.deepcopy(model)
    engine_opt, reference_opt = (
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) for m in (model, twin)
    )
    schedule = RewireSchedule({0: PERIOD})
    engine = create_sparsifier(
        method, model, engine_opt, sparsity=SPARSITY, seed=SEED, schedule=schedule, **RUNS[method]
    )
    reference = Reference(twin, reference_opt, method, **RUNS[method])
    for x, y in train.batches(64, shuffle=True, augment=True, seed=0, epoch=0, drop_last=True):
        for net, opt, masking in ((model, engine_opt, None), (twin, reference_opt, reference)):
            F.cross_entropy(net(x), y).backward()
            if masking is not None:
                masking.mask_gradients()
            opt.step()
            opt.zero_grad()
        engine.step()
        reference.step()
        on_step(engine, reference)
