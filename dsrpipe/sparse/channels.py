"""Channel removal during sparse training (after Chase; Yin et al., NeurIPS 2023).

DSR moves single weights, which a stock runtime cannot skip: it densifies them. Whole channels it
can skip, once the export has cut them. So, while the method reallocates as usual, whole output
channels leave the network for good:

- every time the method's schedule is due, inside [begin, end], the live channels of all layers
  are ranked together by the mean |w| of their filters, the masked zeros included (a filter
  with few or small weights scores low, whatever its layer's size), and the lowest go, until
  `share` of the removable channels are gone. The share removed follows a cubic curve, fast
  early and gentle at the end, as in gradual magnitude pruning;
- a removed channel takes with it everything that could make it non-zero downstream: its rows
  in the layers that write it (weights and bias), its BatchNorm γ and β (so BN's output there is
  exactly 0), and the columns of the layers that read it. All of them are zeroed and held at
  zero (their gradients and momentum too), and sparse tensors never grow there again. The
  export then cuts the channel with nothing to fold or merge;
- the non-zero weights it held go back to the method's budget: they regrow at once in the
  surviving channels, in proportion to what each sparse tensor kept (DSR's own rule), so the
  total of active weights stays exactly the same;
- what "a channel" is comes from Torch-Pruning's dependency graph: the channels of a residual
  stream are one group across every layer that writes or reads the stream (the block convs, the
  shortcut convs, the stem), ranked and removed as one.

A group is removable when a layer that writes it is one of the method's layers (the sparse ones);
it is ranked by those layers' filters alone. With `dense_layers`, a group only dense layers write
(the input layer's channels) is removable too, ranked by their filters. Every group keeps `floor`
of its channels (and at least one), and ends with a multiple of `multiple_of` of them (or all);
removal stops short of leaving the sparse tensors too little room for the budget.
`Channels` is the machinery (owned by a sparsifier, channel_steps.py); `ChannelRemoval` is what
the user asks for (removal.py); groups.py traces the groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UserError
from .cost import channel_cost, next_block, plan_to_budget
from .groups import (
    ChannelGroup,
    GroupMember,
    floor_count,
    listed,
    removable_groups,
    rounding,
    trace_groups,
    unrounded_note,
)
from .removal import ChannelRemoval


def mean_magnitude(group: ChannelGroup) -> torch.Tensor:
    """Chase's ranking, made fair across layers: the mean |w| of each channel's filter, the masked
    zeros included, over its layer's mean |w| (layers start at different scales: a plain mean
    would empty the layers with the largest fan-in first); averaged over the layers that score
    the group."""
    score = torch.zeros(group.channels, dtype=torch.float64)
    for member in group.scored_by:
        magnitude = member.module.weight.detach().abs().double()
        rows = magnitude.flatten(1).mean(1).cpu()
        score += rows[member.index].mean(1) / magnitude.mean().clamp_min(1e-30).cpu()
    return score / len(group.scored_by)


class Channels:
    """The channels a sparsifier removes: which are alive, and keeping the removed ones at zero.

    `sparse` maps module names to (weight, mask) of the sparse tensors (the method's masks,
    changed in place); `score(group)` ranks a group's channels (low goes first)."""

    def __init__(
        self,
        model: nn.Module,
        removal: ChannelRemoval,
        example_inputs: torch.Tensor,
        eligible: set[str],
        sparse: dict[str, tuple[torch.Tensor, torch.Tensor]],
        score: Callable[[ChannelGroup], torch.Tensor] = mean_magnitude,
    ):
        self.removal, self.sparse, self.score = removal, sparse, score
        self.example_inputs, self.eligible = example_inputs, eligible
        self.groups = removable_groups(model, example_inputs, eligible, removal.dense_layers)
        device = example_inputs.device
        self.alive = {g.name: torch.ones(g.channels, dtype=torch.bool, device=device) for g in self.groups}
        # Once the model is shrunk (`cut_out`) a group's channels are numbered anew: `origin` maps
        # them to the channels the group started with, which floors, targets and checkpoints count.
        self.original = {g.name: g.channels for g in self.groups}
        self.origin = {g.name: torch.arange(g.channels) for g in self.groups}
        # the output channel of the group's first writing layer that each original channel is
        self.writer_channel = {g.name: g.scored_by[0].index[:, 0].clone() for g in self.groups}
        self.floor = {g.name: max(floor_count(removal.floor, g.channels), g.least) for g in self.groups}
        self.total = sum(g.channels for g in self.groups)  # the removable channels
        self.shrunk = False  # whether removed channels have been cut out of the model
        self.cost = None  # with a cost budget: what the channels cost (cost.py)
        if removal.budget is not None:
            self.cost = channel_cost(
                model, example_inputs, self.groups, self.floor, removal.budget, removal.multiple_of
            )
        self._open()

    def _open(self) -> None:
        """No position closed, nothing held: at the start, and once a cut took the removed channels away."""
        # Sparse positions no growth may use: rows and columns of removed channels.
        self.closed = {name: torch.zeros_like(mask) for name, (_, mask) in self.sparse.items()}
        self.closed_count = dict.fromkeys(self.sparse, 0)  # elements of each `closed`
        self.keep: dict[nn.Parameter, torch.Tensor] = {}  # zero where a removed channel lives, dense params

    def unrounded_note(self) -> str | None:
        """The line that says which groups `multiple_of` cannot round, if any."""
        return unrounded_note(self.original, self.floor, self.removal.multiple_of)

    @property
    def removed(self) -> int:
        return self.total - sum(int(a.sum()) for a in self.alive.values())

    def alive_counts(self) -> dict[str, int]:
        return {name: int(a.sum()) for name, a in self.alive.items()}

    def removed_per_group(self) -> dict[str, int]:
        return {name: self.original[name] - int(a.sum()) for name, a in self.alive.items()}

    def cost_share(self) -> float | None:
        """The model's cost over the dense model's, in the budget's measure; None without one."""
        return None if self.cost is None else self.cost.share(self.removed_per_group())

    def choose_due(self, iteration: int, active_total: int) -> dict[str, list[int]]:
        """The channels to remove after step `iteration`: the share's count due by now
        (`choose`), or, with a cost budget, the part due by now of the plan that meets it."""
        removal, last = self.removal, self.removal.last(iteration)
        if self.cost is None:
            return self.choose(removal.target(iteration, self.total) - self.removed, active_total, last)
        blocks = self._budget_plan(active_total)
        planned = sum(len(c) for _, c in blocks)
        due = round(removal.progress(iteration) * (self.removed + planned)) - self.removed
        chosen: dict[str, list[int]] = {}
        taken = 0
        for name, block in blocks:  # whole blocks, the best first, as many as are due
            if not last and taken + len(block) / 2 > due:
                break
            chosen.setdefault(name, []).extend(block)
            taken += len(block)
        return chosen

    def _budget_plan(self, active_total: int) -> list[tuple[str, list[int]]]:
        """The channels whose removal meets the cost budget (cost.plan_to_budget), each group
        taking whole multiples of `multiple_of` so that rounding cannot overshoot it."""
        scores, live = self._scores_and_live()
        by_name = {g.name: g for g in self.groups}
        room = self._room()
        step = self.removal.multiple_of

        def allow(name: str, channels: list[int]) -> bool:
            nonlocal room
            trial = self._room_without(room, by_name[name], channels)
            if not self._fits(trial, active_total):
                return False
            room = trial
            return True

        def blocks(name: str, width: int) -> int:
            kind = rounding(self.original[name], self.floor[name], step)
            return next_block(width, self.floor[name], step, kind)

        lowest_first = {n: sorted(c, key=lambda c, n=n: (float(scores[n][c]), c)) for n, c in live.items()}
        target = self.removal.budget.share * self.cost.dense
        return plan_to_budget(
            self.cost, self.removed_per_group(), lowest_first, scores, blocks, allow, target
        )

    def _scores_and_live(self) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        scores = {g.name: self.score(g).to(torch.float64).cpu() for g in self.groups}
        live = {g.name: torch.nonzero(self.alive[g.name].cpu()).flatten().tolist() for g in self.groups}
        return scores, live

    def choose(self, count: int, active_total: int, last: bool = False) -> dict[str, list[int]]:
        """The `count` live channels to remove next: the lowest scores over all groups, each group
        above its floor, and the sparse tensors keeping room for `active_total` weights.

        With `multiple_of` > 1 the removal heads for a plan instead: the lowest channels of all
        that are still to go, each group's live count rounded to the multiple; this removal
        takes its part of every group's share of the plan, and the `last` one all of it."""
        if count <= 0 and not last:
            return {}
        scores, live = self._scores_and_live()
        if self.removal.multiple_of == 1:
            return self._lowest(count, scores, live, active_total)
        remaining = self.removal.target(self.removal.end, self.total) - self.removed
        lowest = self._lowest(max(remaining, 0), scores, live, active_total)
        plan = self._rounded(lowest, live, scores, active_total)
        if last or count >= remaining:
            return plan
        part = count / remaining
        return {
            name: chosen[: round(part * len(chosen))]
            for name, chosen in plan.items()
            if round(part * len(chosen))
        }

    def shortfall(self, active_total: int) -> str | None:
        """After the last removal: one line saying which share of the removable channels went,
        short of the share asked, and what kept the rest (groups at their floor; groups that
        cannot lose a channel and leave the sparse tensors room for the `active_total` weights of
        the budget). None when the share's count went, or when the floors and the budget allow it
        and only `multiple_of` kept it short: its rounding, and the groups it keeps whole, which
        `unrounded_note` names before training."""
        if self.cost is not None:
            return self._budget_shortfall(active_total)
        wanted = self.removal.target(self.removal.end, self.total)
        missing = wanted - self.removed
        if missing <= 0:
            return None
        scores, live = self._scores_and_live()
        if sum(len(c) for c in self._lowest(missing, scores, live, active_total).values()) == missing:
            return None
        return (
            f"channel removal reached share {self.removed / self.total:.2f} of the {self.total} removable "
            f"channels, not the {self.removal.share:g} asked ({self.removed} removed, not {wanted}): "
            + self._what_kept(live, active_total)
        )

    def _budget_shortfall(self, active_total: int) -> str | None:
        budget, share = self.removal.budget, self.cost_share()
        if share <= budget.share:
            return None
        return (
            f"channel removal reached {share:.3f} of the dense model's {budget.measure}, not the "
            f"{budget.share:g} asked: " + self._what_kept(self._scores_and_live()[1], active_total)
        )

    def _what_kept(self, live: dict[str, list[int]], active_total: int) -> str:
        """Why no more channels go: the groups at their floor, those whose removal would leave the
        sparse tensors too little room for the `active_total` weights, those `multiple_of` holds."""
        room = self._room()
        at_floor, no_room, rounded = [], [], []
        for g in self.groups:
            if len(live[g.name]) <= self.floor[g.name]:
                at_floor.append(f"{g.name} ({len(live[g.name])} of {self.original[g.name]})")
            elif not self._fits(self._room_without(room, g, live[g.name][:1]), active_total):
                no_room.append(g.name)
            else:
                rounded.append(g.name)
        reasons = []
        if no_room:
            reasons.append(
                f"{listed(no_room)} cannot lose another channel and leave the sparse layers room for "
                f"the budget's {active_total:,} active weights"
            )
        if at_floor:
            reasons.append(f"{listed(at_floor)} are at their floor (remove_channels.floor; one at least)")
        if rounded:
            reasons.append(f"{listed(rounded)} are kept at a multiple of {self.removal.multiple_of}")
        return "; ".join(reasons)

    def _lowest(self, count, scores, live, active_total) -> dict[str, list[int]]:
        """The `count` lowest-scoring live channels over all groups that floors and room allow,
        lowest first."""
        candidates = [
            (float(scores[g.name][c]), k, c) for k, g in enumerate(self.groups) for c in live[g.name]
        ]
        left = {g.name: len(live[g.name]) for g in self.groups}
        room = self._room()
        chosen: dict[str, list[int]] = {}
        for _, k, c in sorted(candidates):
            if count <= 0:
                break
            g = self.groups[k]
            if left[g.name] <= self.floor[g.name]:
                continue
            trial = self._room_without(room, g, [c])
            if not self._fits(trial, active_total):
                continue  # the budget must still fit in what the sparse tensors keep
            room = trial
            left[g.name] -= 1
            chosen.setdefault(g.name, []).append(c)
            count -= 1
        return chosen

    def _rounded(self, chosen, live, scores, active_total) -> dict[str, list[int]]:
        """`chosen`, each group's live count moved to the nearest multiple of `multiple_of` that
        its floor and the budget allow, or kept whole; lowest first."""
        step = self.removal.multiple_of
        room = self._room()
        rounded: dict[str, list[int]] = {}
        for g in self.groups:
            now = len(live[g.name])
            wanted = now - len(chosen.get(g.name, []))
            options = []
            if rounding(self.original[g.name], self.floor[g.name], step) != "unrounded":
                options = [k for k in range(step, now + 1, step) if k >= self.floor[g.name]]
                options += [now] if now == self.original[g.name] else []
            lowest_first = sorted(live[g.name], key=lambda c: (float(scores[g.name][c]), c))
            # The nearest allowed count first, at a tie the larger: a group at a multiple that the
            # plan takes half a multiple from keeps it (the total is as near the share either
            # way, and a removed channel never comes back). Unrounded if none fits, or none is
            # allowed (`rounding`).
            for keep in sorted(options, key=lambda k: (abs(k - wanted), -k)) + [wanted]:
                trial = self._room_without(room, g, lowest_first[: now - keep])
                if self._fits(trial, active_total):
                    room = trial
                    if keep < now:
                        rounded[g.name] = lowest_first[: now - keep]
                    break
        return rounded

    @staticmethod
    def _fits(room, active_total: int) -> bool:
        return sum(max(r, 0) * max(c, 0) * cell for r, c, cell in room.values()) >= active_total

    def _room(self) -> dict[str, tuple[int, int, int]]:
        """Per sparse tensor: (live rows, live columns, elements per row and column cell)."""
        room = {}
        for name, (weight, _) in self.sparse.items():
            rows, cols = weight.shape[0], weight.shape[1]
            closed = self.closed[name]
            live_rows = int((~closed.flatten(1).all(1)).sum()) if closed.any() else rows
            live_cols = int((~closed.transpose(0, 1).flatten(1).all(1)).sum()) if closed.any() else cols
            room[name] = (live_rows, live_cols, weight[0, 0].numel())
        return room

    def _room_without(self, room, group: ChannelGroup, channels: list[int]):
        room = dict(room)
        for member in group.members:
            if member.name in self.sparse and member.role in ("out", "in"):
                rows, cols, cell = room[member.name]
                gone = len(channels) * member.index.shape[1]
                room[member.name] = (
                    (rows - gone, cols, cell) if member.role == "out" else (rows, cols - gone, cell)
                )
        return room

    @torch.no_grad()
    def remove(self, chosen: dict[str, list[int]], optimizer: torch.optim.Optimizer | None) -> int:
        """Zero and close the chosen channels; returns how many active sparse weights they held."""
        freed = []
        by_name = {g.name: g for g in self.groups}
        for name, channels in chosen.items():
            self.alive[name][channels] = False
            for member in by_name[name].members:
                idx = member.index[channels].flatten().to(self.alive[name].device)
                freed.append(self._zero(member, idx))
        self._clear_state(optimizer)
        return int(torch.stack(freed).sum()) if freed else 0

    def _zero(self, member: GroupMember, idx: torch.Tensor) -> torch.Tensor:
        module = member.module
        if member.role == "norm":
            for param in (module.weight, module.bias):
                if param is not None:
                    self._hold(param, idx, 0)
            if module.running_mean is not None:
                module.running_mean[idx] = 0.0
                module.running_var[idx] = 1.0
            return torch.zeros((), dtype=torch.long, device=idx.device)
        dim = 0 if member.role == "out" else 1
        if member.role == "out" and module.bias is not None:
            self._hold(module.bias, idx, 0)
        if member.name not in self.sparse:
            self._hold(module.weight, idx, dim)
            return torch.zeros((), dtype=torch.long, device=idx.device)
        weight, mask = self.sparse[member.name]
        closing = torch.zeros_like(mask)
        closing.index_fill_(dim, idx, True)
        freed = (mask & closing).sum()
        self.closed[member.name] |= closing
        self.closed_count[member.name] = int(self.closed[member.name].sum())
        mask.logical_and_(~closing)
        weight.masked_fill_(closing, 0.0)
        return freed

    def _hold(self, param: nn.Parameter, idx: torch.Tensor, dim: int) -> None:
        keep = self.keep.setdefault(param, torch.ones_like(param, dtype=torch.bool))
        keep.index_fill_(dim, idx, False)
        param.masked_fill_(~keep, 0.0)

    def _clear_state(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is None:
            return
        for param, keep in self.keep.items():
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == keep.shape:
                    value.mul_(keep)

    @torch.no_grad()
    def hold_gradients(self) -> None:
        """Zero the gradients of what removed channels hold in dense parameters (the sparse ones
        are masked): with no gradient and no momentum they stay exactly 0, weight decay or not."""
        for param, keep in self.keep.items():
            if param.grad is not None:
                param.grad.mul_(keep)

    def cut_list(self) -> list[tuple[nn.Module, list[int]]]:
        """What shrinking cuts: per group with removed channels still in the model, its first
        writing layer and their output channels there."""
        return [
            (g.scored_by[0].module, g.scored_by[0].index[dead].flatten().tolist())
            for g in self.groups
            if len(dead := torch.nonzero(~self.alive[g.name].cpu()).flatten())
        ]

    def cut_out(self, model: nn.Module, sparse: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Take note that the removed channels were cut out of `model` (whose sparse tensors are
        now `sparse`): trace its groups again and number their channels anew."""
        origin = {name: self.origin[name][alive.cpu()] for name, alive in self.alive.items()}
        self.sparse = sparse
        self.groups = trace_groups(model, self.example_inputs, self.eligible, self.removal.dense_layers)
        found = {g.name: g.channels for g in self.groups}
        if found != {name: len(kept) for name, kept in origin.items()}:
            raise RuntimeError(f"shrinking changed the channel groups: {found}, expected {origin}")
        self.origin = origin
        device = self.example_inputs.device
        self.alive = {name: torch.ones(n, dtype=torch.bool, device=device) for name, n in found.items()}
        self.shrunk = True
        self._open()

    def live_channels(self) -> dict[str, list[int]]:
        """Per group, the output channels of its first writing layer still in the model, as the
        model was built: what rebuilds a shrunk architecture (slicing.cut_to_live)."""
        return {name: self.writer_channel[name][kept].tolist() for name, kept in self.origin.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live channels of each group, over the channels it started with."""
        state = {}
        for name, alive in self.alive.items():
            full = torch.zeros(self.original[name], dtype=torch.bool, device=alive.device)
            full[self.origin[name][alive.cpu()].to(alive.device)] = True
            state[name] = full
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], optimizer=None) -> None:
        """Adopt the alive channels of a checkpoint: zero and close everything the removed ones held
        (a sparsifier that shrinks then cuts them out)."""
        if self.shrunk:
            raise RuntimeError("a shrunk model's channels cannot be loaded again")
        if set(state) != set(self.alive) or any(state[n].shape != self.alive[n].shape for n in state):
            raise UserError("the checkpoint's removed channels do not match this model's channel groups")
        for name in self.alive:
            self.alive[name].fill_(True)
        self._open()
        dead = {n: torch.nonzero(~a.cpu()).flatten().tolist() for n, a in state.items()}
        self.remove({n: c for n, c in dead.items() if c}, optimizer)
