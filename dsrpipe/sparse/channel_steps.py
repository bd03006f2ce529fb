"""The sparsifier's side of channel removal (channels.py): starting it, removing the channels due
and regrowing their weights, making the live channels dense (speed first), and cutting the
removed channels out of the model while it trains (`shrink`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .budgets import sample_free_positions, split_in_units
from .channels import Channels, mean_magnitude
from .cost import model_cost
from .removal import ChannelRemoval
from .slicing import Cut, cut, dependency_graph, out_channel_handler
from .units import Units

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


class ChannelSteps:
    """Channel removal for `Sparsifier`, which it is mixed into (the masks, units and optimizer
    are the sparsifier's)."""

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

    @torch.no_grad()
    def remove_channels(self) -> dict[str, Any]:
        """Remove the channels due now (channels.py) and regrow the active weights they held in the
        surviving channels, in proportion to what each tensor kept, so the active total stays."""
        channels = self.channels
        last = channels.removal.last(self.iteration)
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
