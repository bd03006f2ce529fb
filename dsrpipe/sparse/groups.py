"""Channel groups: which channels of a model go together (Torch-Pruning's dependency graph), and
what a group may lose (its floor, and the multiples of `multiple_of` it can end at)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import UserError
from .slicing import (
    LAYERS,
    NORMS,
    all_groups,
    cut,
    dependency_graph,
    grouped,
    opaque,
    out_channel_handler,
    tracing,
)


@dataclass
class GroupMember:
    """One layer of a channel group: which of its indices each channel of the group occupies."""

    module: nn.Module
    name: str
    role: str  # "out" (a Conv2d/Linear writing the channel), "in" (one reading it), "norm" (BatchNorm)
    index: torch.Tensor  # [channels, k]: the k indices of the layer's dimension per channel


@dataclass
class ChannelGroup:
    name: str  # its first writing layer, as model.named_modules() names it
    channels: int
    members: list[GroupMember]
    scored_by: list[GroupMember]  # the writing layers whose filters rank its channels (the sparse ones)
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
    at_check: bool = False,
) -> list[ChannelGroup]:
    """The model's channel groups that a layer named in `eligible` writes (with `any_writer`: that
    any Conv2d or Linear writes, scored by the eligible writers if it has some), traced by
    Torch-Pruning, within slicing.trace_bound(at_check); a model it cannot trace is a UserError
    that names it (`name`, else its class).

    Groups holding layers whose channels this cannot reason about (grouped convs, depthwise ones
    excepted; other layers with per-channel parameters, bare parameters, the model's outputs) are
    left out."""
    with tracing(model, "channel removal", TRACE_ADVICE, name, at_check):
        return _groups(
            model, dependency_graph(model, example_inputs, "channel removal"), eligible, any_writer
        )


def _groups(
    model: nn.Module, graph: tp.DependencyGraph, eligible: set[str], any_writer: bool
) -> list[ChannelGroup]:
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in all_groups(graph):
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
            built.append(GroupMember(module, names[module], role, index))
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
    at_check: bool,
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
    with tracing(trial, "channel removal", TRACE_ADVICE, name, at_check):
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
    at_check: bool = False,
) -> list[ChannelGroup]:
    """`trace_groups`, and a UserError if there is none or if cutting them breaks the model
    (`_check_cut`): what channel removal starts from. `check` traces under the bound
    (`at_check`), training under its slack, so that what check accepts, training accepts."""
    groups = trace_groups(model, example_inputs, eligible, any_writer, name, at_check)
    if not groups:
        raise UserError(
            f"channel removal: {name or type(model).__name__} has no channel that a sparse layer writes "
            "and another layer reads"
        )
    _check_cut(model, example_inputs, groups, eligible, any_writer, name, at_check)
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


def listed(names: list[str]) -> str:
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
        parts.append(f"keeps {listed(kinds['whole'])} whole (no smaller multiple above the floor)")
    if kinds["unrounded"]:
        parts.append(
            f"rounds nothing in {listed(kinds['unrounded'])} (no multiple between the floor and the "
            "width): their channels go as the ranking says"
        )
    return f"channel removal: multiple_of {multiple_of} {'; it '.join(parts)}" if parts else None


def most_removable(groups: list[ChannelGroup], floors: dict[str, int], multiple_of: int) -> dict[str, int]:
    """Per group, the most channels removal can take: down to its floor, and to a multiple of
    `multiple_of` where the group rounds (`rounding`)."""
    most = {}
    for g in groups:
        kind = rounding(g.channels, floors[g.name], multiple_of)
        if kind == "whole":
            keep = g.channels
        elif kind == "unrounded" or multiple_of == 1:
            keep = floors[g.name]
        else:
            keep = -(-max(floors[g.name], multiple_of) // multiple_of) * multiple_of
        most[g.name] = g.channels - keep
    return most
