"""How many active weights each sparse tensor gets and where new ones go: the budgets of a
sparse model at a sparsity, the proportional splits of a reallocation, and the random draws of
free positions."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError

DISTRIBUTIONS = ("uniform", "erk")


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
    goal = total // step
    # reachable[k][r]: whether r·step elements fit exactly into whole units of the tensors order[k:]
    reachable = _reachable(goal, [sizes[i] // step for i in order], [capacity[i] for i in order])
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
        units[i] = _nearest_feasible(nearest, most, size, remaining, reachable[k + 1])
        remaining -= units[i] * size
    return units


def _reachable(goal: int, sizes: list[int], capacity: list[int]) -> list[np.ndarray]:
    """The subset-sum table: reachable[k][r], whether r (0 <= r <= goal, counted in whatever
    `sizes` count in) fits exactly into whole units of the tensors k, k+1, ... (tensor k: at most
    `capacity[k]` units of `sizes[k]`)."""
    reachable = [np.zeros(goal + 1, dtype=bool) for _ in range(len(sizes) + 1)]
    reachable[-1][0] = True
    for k in range(len(sizes) - 1, -1, -1):
        size, left, now = sizes[k], capacity[k], reachable[k + 1].copy()
        piece = 1
        while left > 0 and size <= goal:  # bounded counts as pieces of 1, 2, 4, ... units
            take = min(piece, left)
            if take * size <= goal:
                now[take * size :] |= now[: goal + 1 - take * size].copy()
            left -= take
            piece *= 2
        reachable[k] = now
    return reachable


def _nearest_feasible(nearest: int, most: int, size: int, remaining: int, reachable_after: np.ndarray) -> int:
    """The count of units (0..`most`, of `size` each) closest to `nearest` that leaves a remainder
    the tensors after can hold exactly (`reachable_after`); one exists where the caller's own
    remainder is reachable."""
    for offset in range(most + 1):
        for n in (nearest - offset, nearest + offset):
            if 0 <= n <= most and reachable_after[remaining - n * size]:
                return n
    raise AssertionError("no feasible count of units, though the remainder is reachable")


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
