"""A method's options turned into the library's sparsifier: each options field is passed as the
constructor keyword of the same name, except the few written in epochs or spread over several
settings, built here. The methods themselves, one module each (their options, their sparsifier
and their hooks), are dsrpipe.config.methods: nothing else branches on a method's name.
"""

from __future__ import annotations

from typing import Any

from .config import MethodOptions
from .sparse import ChannelRemoval, RewireSchedule, Sparsifier, method_options


def sparsifier_options(options: MethodOptions, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
    """The library constructor's keywords for these options, epochs turned into iterations."""
    given: dict[str, Any] = {name: getattr(options, name) for name in type(options).model_fields}
    built: dict[str, Any] = {"layers": options.layers, "total_steps": epochs * steps_per_epoch}
    if "stop_rewire_epoch" in given:  # DeepR moves weights every iteration: it has no periods
        periods = given.get("rewire_periods", {0: 1})
        built["schedule"] = RewireSchedule(periods, options.stop_rewire_epoch, steps_per_epoch)
    if "end_epoch" in given:  # a pruning span
        built["begin_iteration"] = options.begin_epoch * steps_per_epoch
        built["end_iteration"] = (
            options.end_epoch * steps_per_epoch if options.end_epoch is not None else None
        )
    removal = given.pop("remove_channels", None)  # the library's ChannelRemoval, or nothing
    if removal is not None:
        begin, end = removal.begin_epoch * steps_per_epoch, removal.end(epochs) * steps_per_epoch
        built["remove_channels"] = ChannelRemoval(
            removal.share or 0.0, begin, end, dense_inside=removal.dense_inside, **_shape(removal)
        )
    built["budget"] = getattr(options, "budget", None)  # a channel-pruning method's cost target
    if options.channel_shape is not None:
        built["example_inputs"] = None  # the methods that trace the model: filled in by `build_sparsifier`
    takes = method_options(options.sparsifier)
    return {name: value for name, value in {**given, **built}.items() if name in takes}


def _shape(removal) -> dict[str, Any]:
    return {
        name: getattr(removal, name) for name in ("floor", "dense_layers", "multiple_of", "shrink", "budget")
    }


def build_sparsifier(
    options: MethodOptions,
    model,
    optimizer,
    *,
    seed: int,
    steps_per_epoch: int,
    epochs: int,
    example_inputs=None,
) -> Sparsifier:
    """The method's sparsifier for this model and optimizer (`example_inputs`: one input batch, for
    the methods that trace the model)."""
    kwargs = sparsifier_options(options, steps_per_epoch=steps_per_epoch, epochs=epochs)
    if "example_inputs" in kwargs:
        kwargs["example_inputs"] = example_inputs
    return options.sparsifier(model, optimizer, seed=seed, **kwargs)
