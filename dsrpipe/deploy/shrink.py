"""Physically shrink a trained sparse model: remove the channels whose filters are entirely zero.

A Conv2d output filter (or a Linear output row) whose weights are all zero produces a channel that
no input can change: 0, or the layer's bias. That channel is removed from the layer, from every
layer coupled to it (the BatchNorm after it, the other branches added into the same residual
stream) and from the inputs of every layer that consumes it, so the exported graph has fewer
channels and does fewer multiply-adds. Torch-Pruning's dependency graph finds what is coupled.

A dead filter does not always make a dead input downstream: BatchNorm turns the constant 0 into
beta - gamma * mean / sqrt(var + eps), an activation may pass it on, and the consumer adds that
constant's contribution into its outputs. Removing the channel is exact only if that contribution
is put back:
- into the consumer's bias, for a Linear and for a conv that pads with anything but zeros (or not
  at all): every output then sees the whole kernel times the constant;
- for a conv with zero padding the border outputs see part of the kernel, so no bias can stand in.
  The constant channels are then merged into one of them that stays (the "representative"): the
  inputs are proportional, so the consumer's weights for the others are added, scaled, to its
  weights for the representative, and one channel is kept instead of many.
A channel is removed only if every filter that writes into it is zero (decided from the weights),
and every consumer sees it as one constant (read off the eval-mode model with forward hooks on a
random probe batch: the exact value each consumer receives, whatever BatchNorm, activations,
pooling and residual adds made of the zero). In the end the shrunk model must reproduce the
original logits on another random batch, else shrinking is refused: a safety net, not the proof.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ..errors import UserError
from ..sparse.cost import model_cost
from ..sparse.slicing import LAYERS, all_groups, cut, dependency_graph, grouped, opaque, tracing

PROBE_BATCH = 4
# Logits may move by float rounding only: the folds change the order of the sums.
DEFAULT_TOLERANCE = 1e-4


@dataclass
class _Plan:
    """What to do with one dependency group: the root layer's channels to remove and the folds
    that keep the consumers' outputs as they were."""

    root: nn.Module
    prune_fn: object
    removed: list[int]
    # (consumer, input index, the constant it sees there), folded into the consumer's bias
    bias_folds: list[tuple[nn.Module, int, float]] = field(default_factory=list)
    # (conv consumer, removed input index, representative input index, value ratio)
    merges: list[tuple[nn.Module, int, int, float]] = field(default_factory=list)


def shrink_model(
    model: nn.Module, input_shape: tuple[int, ...], *, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0
) -> tuple[nn.Module, dict]:
    """A copy of `model` (eval mode) without the channels that dead filters leave constant, and a
    summary: {"removed_channels": {layer: count}, "folds": how many removed inputs had to be put
    back into a consumer's bias or merged into another channel (0 when every removed channel was
    exactly zero), "params_before", "params_after", "macs_before", "macs_after"} (MACs for one input of `input_shape`, the shape of one normalised input sample).

    Raises UserError if the shrunk model's logits differ from the original's by more than
    `tolerance` times the logits' scale (at least 1)."""
    reference = copy.deepcopy(model).eval()
    device = next(reference.parameters(), torch.empty(0)).device
    generator = torch.Generator().manual_seed(seed)
    probe, check = (torch.randn(PROBE_BATCH, *input_shape, generator=generator).to(device) for _ in range(2))
    shrunk = copy.deepcopy(reference)
    removed, folds = {}, 0
    if any(_dead_rows(m) for m in shrunk.modules() if isinstance(m, LAYERS)):
        removed, folds = _remove_dead_channels(shrunk, probe)
        _verify(reference, shrunk, check, tolerance)
    (params_before, macs_before), (params_after, macs_after) = (
        model_cost(reference, probe),
        model_cost(shrunk, probe),
    )
    return shrunk, {
        "removed_channels": removed,
        "folds": folds,
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
    }


def _remove_dead_channels(model: nn.Module, probe: torch.Tensor) -> tuple[dict[str, int], int]:
    """Shrink `model` in place; returns how many output channels each Conv2d / Linear lost, and
    how many folds that took."""
    inputs = _constant_inputs(model, probe)
    # Every plan is made on the unchanged model: a removal with its folds leaves every remaining
    # layer's output as it was, so what was read for one group stays true after another's.
    with tracing(model, "cannot shrink", "export without shrinking (export.shrink: false)"):
        graph = dependency_graph(model, probe, "cannot shrink")
        plans = [plan for group in list(all_groups(graph)) if (plan := _plan_group(graph, group, inputs))]
    with torch.no_grad():
        for plan in plans:
            _fold(plan)
    done = cut(model, graph, [(plan.root, plan.prune_fn, plan.removed) for plan in plans])
    return done.removed_channels, sum(len(p.bias_folds) + len(p.merges) for p in plans)


def _dead_rows(layer: nn.Module) -> list[int]:
    """Output channels of a Conv2d / rows of a Linear whose weights are all zero."""
    return torch.nonzero(layer.weight.detach().flatten(1).eq(0).all(1)).flatten().tolist()


def _constant_inputs(
    model: nn.Module, probe: torch.Tensor
) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per Conv2d / Linear: which input channels (features) hold one value across the random
    probe batch and every position, and that value, exactly as the layer receives it."""
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, args, _output):
        x = args[0].detach()
        per_channel = (
            x.transpose(0, 1).flatten(1) if isinstance(module, nn.Conv2d) else x.reshape(-1, x.shape[-1]).T
        )
        constant = per_channel.eq(per_channel[:, :1]).all(1)
        if module in seen:  # called more than once: constant only if it was so each time, with one value
            was_constant, value = seen[module]
            constant &= was_constant & per_channel[:, 0].eq(value)
        seen[module] = (constant, per_channel[:, 0])

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, LAYERS)]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _needs_merge(layer: nn.Module) -> bool:
    """Whether a constant input channel contributes unevenly to the layer's outputs: a conv that
    pads with zeros, so border outputs see part of the kernel."""
    if not isinstance(layer, nn.Conv2d) or layer.padding_mode != "zeros":
        return False
    return layer.padding == "same" or (layer.padding != "valid" and any(p > 0 for p in layer.padding))


def _plan_group(graph: tp.DependencyGraph, group, inputs) -> _Plan | None:
    """Which root channels of `group` can go and how their consumers are compensated; None when
    nothing can go (or the group holds layers whose channels this module cannot reason about)."""
    roles = _roles(graph, group)
    if roles is None:
        return None
    producers, consumers, by_root = roles
    items = list(group)
    removable = _removable(items, producers, consumers, by_root, inputs)
    if not removable:
        return None
    keep, representative = _kept(items, removable, channels=len(by_root))
    removed = sorted(set(removable) - keep)
    if not removed:
        return None
    plan = _Plan(root=items[0].dep.target.module, prune_fn=items[0].dep.handler, removed=removed)
    _compensate(plan, items, removable, representative)
    return plan


def _roles(graph: tp.DependencyGraph, group):
    """The group's items that write its channels (producers) and that read them (consumers), by
    position, and which of each item's indices every root channel maps to (root -> position ->
    indices; a position absent for a root maps to none); None where the group holds layers whose
    channels this module cannot reason about, or no consumer."""
    producers, consumers = [], []
    by_root: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))  # root -> item -> idxs
    for position, item in enumerate(group):
        module = item.dep.target.module
        if isinstance(module, LAYERS):
            if grouped(module):
                return None  # grouped convs tie input channels to output channels in groups
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            (producers if is_out else consumers).append(position)
        elif opaque(module):
            return None  # a model output, or a layer with per-channel parameters of a kind not handled here
        for idx, root in zip(item.idxs, item.root_idxs):
            by_root[root][position].append(idx)
    if not consumers:
        return None  # the classifier: its channels are the logits
    return producers, consumers, by_root


def _removable(items, producers, consumers, by_root, inputs) -> dict[int, dict[int, list[tuple[int, float]]]]:
    """The root channels that every producer writes as zero and every consumer sees as a constant:
    root channel -> consumer position -> [(index, the constant seen there)]."""
    dead_rows = {p: set(_dead_rows(items[p].dep.target.module)) for p in producers}
    seen_by = {p: [t.tolist() for t in inputs[items[p].dep.target.module]] for p in consumers}
    removable: dict[int, dict[int, list[tuple[int, float]]]] = {}
    for root, mapped in by_root.items():
        if not all(set(mapped[p]) <= dead_rows[p] for p in producers):
            continue
        seen = {}
        for p in consumers:
            constant, value = seen_by[p]
            if not all(constant[i] for i in mapped[p]):
                break
            seen[p] = [(i, value[i]) for i in mapped[p]]
        else:
            removable[root] = seen
    return removable


def _kept(items, removable, channels: int) -> tuple[set[int], int | None]:
    """Of the removable channels, those that stay, and the representative that the others are
    merged into where a zero-padded conv sees them (None if there is none)."""

    def merged_into(root):  # consumers where this channel would need a representative
        return {
            p
            for p, values in removable[root].items()
            if _needs_merge(items[p].dep.target.module) and any(v != 0 for _, v in values)
        }

    needy = {root for root in removable if merged_into(root)}
    # A representative stands in for a channel only through a one-to-one index mapping.
    needy_ok = {r for r in needy if all(len(removable[r][p]) == 1 for p in merged_into(r))}
    keep = needy - needy_ok
    merge_at = set().union(*(merged_into(r) for r in needy_ok)) if needy_ok else set()
    representative = None
    if needy_ok:
        # The representative must be non-zero wherever something is merged into it; the largest
        # such value keeps the scaling ratios small.
        score = {
            r: min(abs(removable[r][p][0][1]) if len(removable[r][p]) == 1 else 0.0 for p in merge_at)
            for r in needy_ok
        }
        representative = max(needy_ok, key=lambda r: (score[r], -r))
        if score[representative] == 0:
            keep |= needy_ok
            representative = None
        else:
            keep.add(representative)
    if not keep and len(removable) == channels:
        keep.add(min(removable))  # a layer keeps at least one channel
    return keep, representative


def _compensate(plan: _Plan, items, removable, representative: int | None) -> None:
    """The folds that put each removed channel's non-zero constant back: merged into the
    representative for a zero-padded conv, into the bias for any other consumer."""
    for channel in plan.removed:
        for p, values in removable[channel].items():
            layer = items[p].dep.target.module
            for idx, value in values:
                if value == 0:
                    continue
                if _needs_merge(layer):
                    ((rep_idx, rep_value),) = removable[representative][p]
                    plan.merges.append((layer, idx, rep_idx, value / rep_value))
                else:
                    plan.bias_folds.append((layer, idx, value))


def _fold(plan: _Plan) -> None:
    """Put the removed channels' contributions back into the consumers, computed in float64."""
    for layer, idx, value in plan.bias_folds:
        weights = layer.weight[:, idx].double()
        contribution = value * (weights.flatten(1).sum(1) if weights.dim() > 1 else weights)
        if layer.bias is None:
            layer.bias = nn.Parameter(
                torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device)
            )
        layer.bias.copy_(layer.bias.double() + contribution)
    for layer, idx, rep_idx, ratio in plan.merges:
        layer.weight[:, rep_idx] = layer.weight[:, rep_idx].double() + ratio * layer.weight[:, idx].double()


def _verify(reference: nn.Module, shrunk: nn.Module, batch: torch.Tensor, tolerance: float) -> None:
    """The safety net: the shrunk model must give the original logits on a fresh random batch."""
    with torch.no_grad():
        expected = reference(batch)
        try:
            got = shrunk(batch)
        except RuntimeError as exc:
            raise UserError(
                f"shrinking broke the model ({str(exc).splitlines()[0]}); "
                "export without shrinking (export.shrink: false)"
            ) from None
    scale = max(1.0, float(expected.abs().max()))
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if not diff <= tolerance * scale:
        raise UserError(
            f"shrinking changed the logits by {diff:.3g} (allowed {tolerance * scale:.3g}); "
            "export without shrinking (export.shrink: false)"
        )
