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
`Channels` is the machinery (owned by a sparsifier); `ChannelRemoval` is what the user asks for.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import UserError
from .slicing import LAYERS, NORMS, cut, dependency_graph, grouped, opaque, out_channel_handler, tracing


@dataclass(frozen=True)
class ChannelRemoval:
    """Remove `share` of the removable channels between iterations `begin` and `end`, each group
    keeping at least `floor` of its channels; `steps`: how many removal events (evenly spaced,
    the last at `end`), or None to remove whenever the method's schedule is due (cubic curve);
    `dense_layers`: the channels that only dense layers write (the input layer's) are removable
    too, ranked by those layers' filters; `multiple_of`: after the last removal each group's
    live channels are a multiple of it (or all), the removed count as near the share's as the
    multiples allow; `shrink`: after each removal, cut the removed channels out of the model
    (`Sparsifier.shrink`), so that training costs what the smaller model costs, rather than
    holding them at zero."""

    share: float
    begin: int = 0
    end: int = 1
    floor: float = 0.1
    steps: int | None = None
    dense_layers: bool = True
    # onnxruntime's CPU convolutions work in blocks of 16 channels on AVX-512 (8 on AVX2) and pad
    # the rest: 33 live channels cost what 48 do (docs/methods.md, "Channel removal").
    multiple_of: int = 16
    shrink: bool = True

    def __post_init__(self):
        if not 0.0 <= self.share < 1.0:
            raise UserError(f"channel share must be in [0, 1), got {self.share}")
        if not 0.0 <= self.floor <= 1.0:
            raise UserError(f"channel floor must be in [0, 1], got {self.floor}")
        if not 0 <= self.begin < self.end:
            raise UserError(
                f"channel removal must begin before it ends (iterations {self.begin}, {self.end})"
            )
        if self.steps is not None and self.steps < 1:
            raise UserError(f"channel removal steps must be at least 1, got {self.steps}")
        if self.multiple_of < 1:
            raise UserError(f"channel multiple_of must be at least 1, got {self.multiple_of}")

    def target(self, iteration: int, removable: int) -> int:
        """Channels removed in all by `iteration`."""
        progress = min(max((iteration - self.begin) / (self.end - self.begin), 0.0), 1.0)
        if self.steps is not None:  # in equal steps
            progress = math.floor(progress * self.steps + 1e-9) / self.steps
            return round(self.share * removable * progress)
        return round(self.share * removable * (1 - (1 - progress) ** 3))

    def due(self, iteration: int, scheduled: bool) -> bool:
        """Whether to remove after step `iteration`, `scheduled`: whether the method reallocates now."""
        if not self.begin < iteration <= self.end:
            return False
        if self.steps is None:
            return scheduled or iteration == self.end
        span = self.end - self.begin
        return any(iteration == self.begin + round(span * k / self.steps) for k in range(1, self.steps + 1))


@dataclass
class _Member:
    """One layer of a channel group: which of its indices each channel of the group occupies."""

    module: nn.Module
    name: str
    role: str  # "out" (a Conv2d/Linear writing the channel), "in" (one reading it), "norm" (BatchNorm)
    index: torch.Tensor  # [channels, k]: the k indices of the layer's dimension per channel


@dataclass
class ChannelGroup:
    name: str  # its first writing layer, as model.named_modules() names it
    channels: int
    members: list[_Member]
    scored_by: list[_Member]  # the writing layers whose filters rank its channels (the sparse ones)
    tp_group: Any = None  # Torch-Pruning's group, for its importance measures

    @property
    def least(self) -> int:
        """The fewest channels it may keep: two where a depthwise conv holds them (at one it is
        a plain conv, which Torch-Pruning no longer ties to its input: the group would split)."""
        depthwise = any(isinstance(m.module, nn.Conv2d) and m.module.groups > 1 for m in self.members)
        return min(2, self.channels) if depthwise else 1


# What a model that cannot be traced is told (slicing.tracing).
TRACE_ADVICE = "this model cannot take channel removal (docs/models.md lists the models that can)"


def trace_groups(
    model: nn.Module,
    example_inputs: torch.Tensor,
    eligible: set[str],
    any_writer: bool = False,
    name: str | None = None,
) -> list[ChannelGroup]:
    """The model's channel groups that a layer named in `eligible` writes (with `any_writer`: that
    any Conv2d or Linear writes, scored by the eligible writers if it has some), traced by
    Torch-Pruning, within slicing.TRACE_SECONDS; a model it cannot trace is a UserError that
    names it (`name`, else its class).

    Groups holding layers whose channels this cannot reason about (grouped convs, depthwise ones
    excepted; other layers with per-channel parameters, bare parameters, the model's outputs) are
    left out."""
    with tracing(model, "channel removal", TRACE_ADVICE, name):
        return _groups(
            model, dependency_graph(model, example_inputs, "channel removal"), eligible, any_writer
        )


def _groups(
    model: nn.Module, graph: tp.DependencyGraph, eligible: set[str], any_writer: bool
) -> list[ChannelGroup]:
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(root_module_types=LAYERS):
        members: dict[tuple[nn.Module, str], dict[int, list[int]]] = {}
        usable = True
        for item in group:
            module = item.dep.target.module
            if isinstance(module, LAYERS):
                if grouped(module):
                    usable = False
                role = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            elif isinstance(module, NORMS):
                role = "norm"
            elif opaque(module) or isinstance(module, tp.ops._SliceOp):
                # A slice (GhostNet's `[:, :out_chs]` after a concatenation) keeps some of the
                # channels: where each one lands moves once others are cut.
                usable = False
                continue
            else:
                continue  # adds, reshapes, pooling: nothing of their own to zero
            per_channel = members.setdefault((module, role), {})
            for idx, root in zip(item.idxs, item.root_idxs):
                per_channel.setdefault(int(root), []).append(int(idx))
        writers = [names[m] for (m, role) in members if role == "out"]
        if not any_writer:
            writers = [n for n in writers if n in eligible]
        if not usable or not writers or not any(role == "in" for _, role in members):
            continue
        channels = max(len(per) for per in members.values())
        built = []
        for (module, role), per_channel in members.items():
            widths = {len(v) for v in per_channel.values()}
            if len(per_channel) != channels or len(widths) != 1 or not _within(module, role, per_channel):
                usable = False  # a layer that sees only some of the group's channels, or not all of them
                break
            index = torch.tensor([sorted(per_channel[c]) for c in range(channels)], dtype=torch.long)
            built.append(_Member(module, names[module], role, index))
        if not usable:
            continue
        writing = [m for m in built if m.role == "out"]
        scored_by = [m for m in writing if m.name in eligible] or writing
        groups.append(ChannelGroup(scored_by[0].name, channels, built, scored_by, group))
    return sorted(groups, key=lambda g: list(names.values()).index(g.name))


def _within(module: nn.Module, role: str, per_channel: dict[int, list[int]]) -> bool:
    """Whether every index lies inside the layer's dimension: Torch-Pruning's index mappings
    through some attention's reshapes (MobileNetV4's multi-query attention) point past it."""
    width = module.num_features if role == "norm" else module.weight.shape[0 if role == "out" else 1]
    return max(max(indices) for indices in per_channel.values()) < width


def _check_cut(
    model: nn.Module,
    example_inputs: torch.Tensor,
    groups: list[ChannelGroup],
    eligible: set[str],
    any_writer: bool,
    name: str | None,
) -> None:
    """Cut every group down to the fewest channels it may keep (`ChannelGroup.least`) in a copy
    of `model`, as shrinking during training cuts them, run it and trace it again: a model that
    the cut breaks, or whose channel groups it changes (a forward that reads a width it stored
    when built), is refused here, before any training, rather than at its first cut."""
    trial = copy.deepcopy(model)
    modules = dict(trial.named_modules())
    removals, expected = [], {}
    for group in groups:
        gone = list(range(group.channels - group.least))
        writer = modules[group.scored_by[0].name]
        removals.append(
            (writer, out_channel_handler(writer), group.scored_by[0].index[gone].flatten().tolist())
        )
        expected[group.name] = group.channels - len(gone)
    with tracing(trial, "channel removal", TRACE_ADVICE, name):
        cut(trial, dependency_graph(trial, example_inputs, "channel removal"), removals)
        with torch.no_grad():
            trial.eval()(example_inputs)
        found = _groups(
            trial, dependency_graph(trial, example_inputs, "channel removal"), eligible, any_writer
        )
    if {g.name: g.channels for g in found} != expected:
        raise UserError(
            f"channel removal: cutting channels out of {name or type(model).__name__} changes its channel "
            f"groups (its forward reads a width it stored); {TRACE_ADVICE}"
        )


def removable_groups(
    model: nn.Module,
    example_inputs: torch.Tensor,
    eligible: set[str],
    any_writer: bool = False,
    name: str | None = None,
) -> list[ChannelGroup]:
    """`trace_groups`, and a UserError if there is none or if cutting them breaks the model
    (`_check_cut`): what channel removal starts from."""
    groups = trace_groups(model, example_inputs, eligible, any_writer, name)
    if not groups:
        raise UserError(
            f"channel removal: {name or type(model).__name__} has no channel that a sparse layer writes "
            "and another layer reads"
        )
    _check_cut(model, example_inputs, groups, eligible, any_writer, name)
    return groups


def floor_count(floor: float, channels: int) -> int:
    """The channels a group of `channels` keeps at least: `floor` of them, rounded up, and one."""
    return max(1, math.ceil(floor * channels))


def rounding(channels: int, floor: int, multiple_of: int) -> str:
    """What `multiple_of` does to a group of `channels` that keeps at least `floor`: "rounded"
    (it can end at a smaller multiple), "whole" (its width is a multiple and no smaller one is
    above the floor: it keeps every channel), or "unrounded" (no multiple fits, as in a group
    narrower than the multiple: it loses channels as the ranking says)."""
    largest = (channels - 1) // multiple_of * multiple_of  # the largest multiple below the width
    if largest >= max(floor, multiple_of):
        return "rounded"
    return "whole" if channels % multiple_of == 0 else "unrounded"


def _listed(names: list[str]) -> str:
    """Names for a one-line message: the first four, and how many more."""
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def unrounded_note(channels: dict[str, int], floors: dict[str, int], multiple_of: int) -> str | None:
    """One line naming the groups (name: channels, as built) that `multiple_of` cannot round
    (`rounding`): those it keeps whole, those whose channels go unrounded; None if none."""
    if multiple_of == 1:
        return None
    kinds: dict[str, list[str]] = {"whole": [], "unrounded": []}
    for name, n in channels.items():
        kind = rounding(n, floors[name], multiple_of)
        if kind != "rounded":
            kinds[kind].append(f"{name} ({n} channels)")

    parts = []
    if kinds["whole"]:
        parts.append(f"keeps {_listed(kinds['whole'])} whole (no smaller multiple above the floor)")
    if kinds["unrounded"]:
        parts.append(
            f"rounds nothing in {_listed(kinds['unrounded'])} (no multiple between the floor and the "
            "width): their channels go as the ranking says"
        )
    return f"channel removal: multiple_of {multiple_of} {'; it '.join(parts)}" if parts else None


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

    def choose(self, count: int, active_total: int, last: bool = False) -> dict[str, list[int]]:
        """The `count` live channels to remove next: the lowest scores over all groups, each group
        above its floor, and the sparse tensors keeping room for `active_total` weights.

        With `multiple_of` > 1 the removal heads for a plan instead: the lowest channels of all
        that are still to go, each group's live count rounded to the multiple; this removal
        takes its part of every group's share of the plan, and the `last` one all of it."""
        if count <= 0 and not last:
            return {}
        scores = {g.name: self.score(g).to(torch.float64).cpu() for g in self.groups}
        live = {g.name: torch.nonzero(self.alive[g.name].cpu()).flatten().tolist() for g in self.groups}
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
        wanted = self.removal.target(self.removal.end, self.total)
        missing = wanted - self.removed
        if missing <= 0:
            return None
        scores = {g.name: self.score(g).to(torch.float64).cpu() for g in self.groups}
        live = {g.name: torch.nonzero(self.alive[g.name].cpu()).flatten().tolist() for g in self.groups}
        if sum(len(c) for c in self._lowest(missing, scores, live, active_total).values()) == missing:
            return None
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
                f"{_listed(no_room)} cannot lose another channel and leave the sparse layers room for "
                f"the budget's {active_total:,} active weights"
            )
        if at_floor:
            reasons.append(f"{_listed(at_floor)} are at their floor (remove_channels.floor; one at least)")
        if rounded:
            reasons.append(f"{_listed(rounded)} are kept at a multiple of {self.removal.multiple_of}")
        return (
            f"channel removal reached share {self.removed / self.total:.2f} of the {self.total} removable "
            f"channels, not the {self.removal.share:g} asked ({self.removed} removed, not {wanted}): "
            + "; ".join(reasons)
        )

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

    def _zero(self, member: _Member, idx: torch.Tensor) -> torch.Tensor:
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
