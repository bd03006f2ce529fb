"""What `dsrpipe check` verifies about the model itself, and training again before its first step:
that the model takes the configured inputs, and, where the method removes channels (channel
removal, prune-channels), that Torch-Pruning can trace its channel groups. Either failing is one
line before any epoch runs, rather than a crash in the middle of training."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import Pipeline
from .errors import UserError
from .models import create_model, input_size_refusal
from .sparse.cost import channel_cost
from .sparse.groups import floor_count, most_removable, removable_groups, unrounded_note

# (channels, side) of the images of each dataset whose files fix them: `check` must know them
# without reading the files (dsrpipe/data reads the images and takes both from them). An image
# folder is decoded to RGB at data.image_size, or at its images' median side when that is not set.
NATIVE_INPUT = {
    "digits": (1, 8),
    "mnist": (1, 28),
    "fashion-mnist": (1, 28),
    "cifar10": (3, 32),
    "cifar100": (3, 32),
}
IMAGEFOLDER_CHANNELS = 3
# The classifier's width changes neither the inputs a model takes nor its removable channels (the
# logits are never removed), so `check` builds the model with any number of classes.
CHECK_CLASSES = 10


def input_shape(cfg: Pipeline) -> tuple[int, int] | None:
    """(channels, side) of the model's inputs, or None where only the image files know the side."""
    if cfg.data.dataset == "imagefolder":
        return (IMAGEFOLDER_CHANNELS, cfg.data.image_size) if cfg.data.image_size else None
    channels, side = NATIVE_INPUT[cfg.data.dataset]
    return channels, cfg.data.image_size or side


def check_input_size(model: nn.Module, example_inputs: torch.Tensor, name: str) -> None:
    """One eval-mode forward pass of `example_inputs`: a model whose layers reduce the image below
    what they take (a kernel larger than what is left of it) fails here, in one line. Eval mode,
    without gradients: nothing of the model (BatchNorm's statistics) or the random state changes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        shape = "x".join(map(str, example_inputs.shape[1:]))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise input_size_refusal(name, shape, reason) from None
    finally:
        model.train(was_training)


def check_model(cfg: Pipeline, note: Callable[[str], None]) -> nn.Module | None:
    """Build the configured model at the configured input size and run it once; where channels
    are removed, trace its channel groups as training will, within slicing.TRACE_SECONDS (training
    allows TRACE_SLACK times that: a model check accepts is not refused at training's tracing).
    `note` hears what cannot be checked here, and settings that will not do what they say.
    Returns the model it built (CHECK_CLASSES classes), None where the input size is not known."""
    shape = input_shape(cfg)
    removal = cfg.sparsity.channel_shape
    if shape is None and removal is not None and removal.latency is not None:
        raise UserError(
            "sparsity.remove_channels.latency needs data.image_size: the layer times it aims at are "
            "measured at the input size (or give a macs target)"
        )
    if shape is None:
        note(
            "data.image_size is not set: the model's fit to the images (and its channel tracing) "
            "is checked when training starts"
        )
        return None
    channels, side = shape
    model = create_model(
        cfg.model.name, num_classes=CHECK_CLASSES, in_channels=channels, image_size=side, **cfg.model.options
    )
    example = torch.zeros(1, channels, side, side)
    check_input_size(model, example, cfg.model.name)
    if removal is not None:
        eligible = set(cfg.sparsity.layers.select(model))
        groups = removable_groups(
            model, example, eligible, removal.dense_layers, cfg.model.name, at_check=True
        )
        floors = {g.name: max(floor_count(removal.floor, g.channels), g.least) for g in groups}
        if line := unrounded_note({g.name: g.channels for g in groups}, floors, removal.multiple_of):
            note(line)
        if removal.budget is not None:
            setting = "sparsity" if removal is cfg.sparsity else "sparsity.remove_channels"
            check_budget(model, example, groups, floors, removal, setting)
    return model


def check_budget(
    model: nn.Module, example: torch.Tensor, groups, floors: dict[str, int], removal, setting: str
) -> None:
    """A cost target that the floors and `multiple_of` leave out of reach is a UserError (for a
    latency target, this measures the layer times, which later runs on this machine reuse)."""
    budget = removal.budget
    cost = channel_cost(model, example, groups, floors, budget, removal.multiple_of)
    least = cost.share(most_removable(groups, floors, removal.multiple_of))
    if least > budget.share:
        raise UserError(
            f"{setting}.{budget.measure} {budget.share:g} cannot be met: with every layer at its floor "
            f"(floor {removal.floor:g}, multiple_of {removal.multiple_of}) the model keeps {least:.3f} "
            f"of the dense model's {budget.measure}"
        )
