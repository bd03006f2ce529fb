"""The sparse-training methods a pipeline can name: the one home of each method. A method is its
options (what the YAML says, a `config.methods` class), the library class that runs it (a
`sparse` Sparsifier), and its hooks: how it changes the model the pipeline configures
(thin-dense narrows it; frozen takes the live channels of the run it starts from) and the method
whose finished run it starts from in a grid. Whether it starts from a run (`options.source`),
traces the model (`options.channel_shape`) or keeps every weight is its options' to say.

The built-in methods register their two halves by name on each side (`config.METHOD_OPTIONS`,
`sparse.METHODS`); this module joins them with their hooks and refuses a method without both
halves when it is imported. A method from outside registers all of it here, in one call
(`register`), and everything else finds it through this table: nothing else branches on a
method's name. The options reach the library by name: an options field is passed as the
constructor keyword of the same name, except the few written in epochs or spread over several
settings, built below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .checkpoint import read_finished_run
from .config import METHOD_OPTIONS, MethodOptions, register_options, unregister_options
from .sparse import METHODS as SPARSIFIERS
from .sparse import ChannelRemoval, LayerSelection, RewireSchedule, Sparsifier, method_options
from .sparse.thin import thin_model_options
from .trained import ModelSpec

# A method's model: the configured spec, the method's options and where to say what it changed.
SpecHook = Callable[[ModelSpec, MethodOptions, Callable[[str], None]], ModelSpec]


@dataclass(frozen=True)
class Method:
    options: type[MethodOptions]
    sparsifier: type[Sparsifier]
    # The model it trains, from the configured one (None: the configured one).
    model_spec: SpecHook | None = None
    # In a grid, the method whose run (same seed; its sparsity, or 0 for a dense one) it starts from.
    starts_from: str | None = None

    @property
    def name(self) -> str:
        return self.options.model_fields["method"].default


def _thin_spec(spec: ModelSpec, options: MethodOptions, note: Callable[[str], None]) -> ModelSpec:
    """thin-dense: a narrower dense model with the sparse model's parameter count."""
    narrowed, params, budget = thin_model_options(
        spec.name,
        spec.options,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        sparsity=options.sparsity,
        layers=layer_selection(options),
    )
    note(
        f"thin-dense: {narrowed} gives {params:,} parameters for a budget of {budget:,} "
        f"({params / budget - 1:+.1%})"
    )
    return ModelSpec(
        **{**spec.to_dict(), "options": narrowed, "thin_dense": {"params": params, "budget": budget}}
    )


def _source_spec(spec: ModelSpec, options: MethodOptions, note: Callable[[str], None]) -> ModelSpec:
    """frozen, from a run that shrank while it trained: that run's narrower model."""
    option, path = options.source
    source = read_finished_run(path, option)["model_spec"]
    live = source.get("live_channels") if isinstance(source, dict) else None
    return spec.with_live_channels(live) if live else spec


_HOOKS: dict[str, dict[str, Any]] = {
    "thin-dense": {"model_spec": _thin_spec},
    "frozen": {"model_spec": _source_spec, "starts_from": "dsr"},
    "prune": {"starts_from": "dense"},
    "prune-channels": {"starts_from": "dense"},
}


def _joined() -> dict[str, Method]:
    unpaired = set(METHOD_OPTIONS) ^ set(SPARSIFIERS)
    if unpaired:
        raise ImportError(f"methods without both options and a sparsifier: {', '.join(sorted(unpaired))}")
    return {
        name: Method(options, SPARSIFIERS[name], **_HOOKS.get(name, {}))
        for name, options in METHOD_OPTIONS.items()
    }


METHODS: dict[str, Method] = _joined()


def register(method: Method) -> None:
    """Add a method, all of it: the pipeline schema takes its options from then on, and `run`
    (and a grid's plan) trains it like any other."""
    if method.name in METHODS:
        raise ValueError(f"a method named '{method.name}' is registered already")
    register_options(method.options)
    METHODS[method.name] = method


def unregister(name: str) -> None:
    """Remove a method `register` added."""
    METHODS.pop(name, None)
    unregister_options(name)


def method_of(options: MethodOptions) -> Method:
    return METHODS[options.method]


def model_spec(options: MethodOptions, configured: ModelSpec, note: Callable[[str], None]) -> ModelSpec:
    """The model the method trains, from the configured one."""
    hook = method_of(options).model_spec
    return configured if hook is None else hook(configured, options, note)


def layer_selection(options: MethodOptions) -> LayerSelection:
    """The sparse layers as the library takes them."""
    return LayerSelection(options.dense_first, options.dense_last, options.exclude, options.sparse_tensors)


def sparsifier_options(options: MethodOptions, *, steps_per_epoch: int, epochs: int) -> dict[str, Any]:
    """The library constructor's keywords for these options, epochs turned into iterations."""
    given: dict[str, Any] = {name: getattr(options, name) for name in type(options).model_fields}
    built: dict[str, Any] = {"layers": layer_selection(options), "total_steps": epochs * steps_per_epoch}
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
    takes = method_options(method_of(options).sparsifier)
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
    return method_of(options).sparsifier(model, optimizer, seed=seed, **kwargs)
