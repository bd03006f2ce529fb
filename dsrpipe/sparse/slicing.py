"""Cutting channels out of a model: the one slicing mechanism of training and export.

Torch-Pruning traces which layers share a channel (a conv, the BatchNorm after it, the layers
that read it, the other writers of a residual stream) and slices them all. What it does not slice
is what rides on a layer's parameters outside the model: an optimizer's momentum, a sparsifier's
masks. `cut` therefore also says, per parameter, which indices of which dimensions it dropped,
so that the caller slices those tensors the same way (`Cut.apply`).

Used by the export's shrink (deploy/shrink.py) and by shrinking during training
(`Sparsifier.shrink`), and to rebuild a shrunk architecture from the live channels a checkpoint
records (`cut_to_live`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ..errors import UserError

LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def dependency_graph(
    model: nn.Module, example_inputs: torch.Tensor, what: str, advice: str = ""
) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model`, traced in eval mode (a traced forward must not
    move BatchNorm's running statistics); a model it cannot trace is a UserError that says `what`
    needed it (and `advice`, what to do instead)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # Torch-Pruning traces through autograd
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as exc:  # a model Torch-Pruning cannot trace: say so, not a page of its internals
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{what}: the channel dependencies of {type(model).__name__} could not be traced ({message})"
            + (f"; {advice}" if advice else "")
        ) from None
    finally:
        model.train(was_training)


def out_channel_handler(layer: nn.Module):
    """Torch-Pruning's function that removes output channels of a Conv2d or Linear."""
    return tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels


def sliced_dims(module: nn.Module, is_out: bool) -> list[tuple[str, int]]:
    """The (parameter, dimension) pairs that a channel of `module` occupies: a Conv2d/Linear's
    output rows and bias, its input columns, a BatchNorm's γ and β. Torch-Pruning slices exactly
    these; so do the tensors riding on them."""
    if isinstance(module, NORMS):
        return [("weight", 0), ("bias", 0)]
    if isinstance(module, LAYERS):
        return [("weight", 0), ("bias", 0)] if is_out else [("weight", 1)]
    raise UserError(f"cannot slice the channels of a {type(module).__name__}")


@dataclass
class Cut:
    """What `cut` removed: per (module, parameter name), the dropped indices per dimension, and
    per Conv2d/Linear (by name) how many output channels it lost."""

    dropped: dict[tuple[nn.Module, str], dict[int, set[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )
    removed_channels: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def kept(self, module: nn.Module, name: str, shape: torch.Size, device) -> dict[int, torch.Tensor]:
        """Per sliced dimension, the indices that stay."""
        return {
            dim: torch.tensor(sorted(set(range(shape[dim])) - gone), dtype=torch.long, device=device)
            for dim, gone in self.dropped.get((module, name), {}).items()
        }

    def apply(self, module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, shaped like the parameter `name` of `module` was before the cut, sliced as it was."""
        for dim, keep in self.kept(module, name, tensor.shape, tensor.device).items():
            tensor = tensor.index_select(dim, keep)
        return tensor.contiguous()


def cut(
    model: nn.Module, graph: tp.DependencyGraph, removals: Iterable[tuple[nn.Module, object, list[int]]]
) -> Cut:
    """Remove, in place, the output channels `idxs` of each (layer, Torch-Pruning handler, idxs)
    of `removals`, with everything Torch-Pruning couples to them; every plan refers to the
    unchanged model's indices (so: at most one removal per channel group)."""
    names = {m: n for n, m in model.named_modules()}
    done = Cut()
    groups = [graph.get_pruning_group(layer, handler, idxs) for layer, handler, idxs in removals if idxs]
    for group in groups:
        for item in group:
            module = item.dep.target.module
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            if not any(True for _ in module.parameters(recurse=False)):
                continue  # adds, reshapes, pooling: nothing of their own to slice
            for param, dim in sliced_dims(module, is_out):
                if getattr(module, param, None) is not None:
                    done.dropped[module, param][dim].update(int(i) for i in item.idxs)
            if isinstance(module, LAYERS) and is_out:
                done.removed_channels[names[module]] += len(item.idxs)
    with torch.no_grad():
        for group in groups:
            group.prune()
    done.removed_channels = dict(sorted(done.removed_channels.items()))
    return done


def live_out_channels(model: nn.Module, layers: Iterable[str]) -> dict[str, int]:
    """The output channels each named layer has now."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.shape[0] for name in layers}


def cut_to_live(model: nn.Module, example_inputs: torch.Tensor, live: dict[str, list[int]]) -> Cut:
    """Rebuild a shrunk architecture: keep only the output channels `live[layer]` (the original
    indices) of each named Conv2d/Linear, and what is coupled to them; `model` as built, full width."""
    modules = dict(model.named_modules())
    removals = []
    for name, keep in live.items():
        layer = modules.get(name)
        if not isinstance(layer, LAYERS) or not set(keep) <= set(range(layer.weight.shape[0])) or not keep:
            raise UserError(f"the recorded live channels of '{name}' do not fit this model")
        gone = sorted(set(range(layer.weight.shape[0])) - set(keep))
        removals.append((layer, out_channel_handler(layer), gone))
    if not any(gone for _, _, gone in removals):
        return Cut()
    return cut(model, dependency_graph(model, example_inputs, "shrinking"), removals)


def model_cost(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(parameters, multiply-accumulates of one forward pass of one sample), by Torch-Pruning."""
    was_training = model.training
    model.eval()
    try:
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs=example_inputs[:1])
    finally:
        model.train(was_training)
    return sum(p.numel() for p in model.parameters()), int(macs)
