"""Model zoo: a timm-style name -> factory registry, falling back to any torchvision classification model.

A factory is called as ``fn(*, num_classes, in_channels, image_size, **options)`` and returns a module
mapping normalised float NCHW input ``(N, in_channels, image_size, image_size)`` to logits
``(N, num_classes)``. Conventions the sparsifier and exporter rely on: plain nn.Conv2d / nn.Linear /
nn.BatchNorm2d modules (no functional or shared weights); the first Conv2d (first Linear for MLPs) in
``named_modules()`` order is the input layer, and the last nn.Linear is the classifier.

Like timm's ``default_cfg`` (``first_conv``, ``classifier``), a registration may name a model's input
layer and classifier and declare which other layers the sparse methods keep dense by default (a WRN's
1x1 shortcut convs, a ResNet's downsample convs, as in the DSR paper); ``create_model`` attaches them to
the model as ``model.dense_defaults`` (a ``DenseDefaults``), where ``dsrpipe.sparse`` reads them.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dsrpipe.errors import UserError

ModelFactory = Callable[..., nn.Module]
# Maps a name to the options it encodes, None if the name is not in the family; raises UserError
# for a name that is in the family but invalid (e.g. a WRN depth that is not 6n+4).
NameParser = Callable[[str], "dict | None"]


@dataclass(frozen=True)
class DenseDefaults:
    """Which layers of a model the sparse methods keep dense unless a pipeline says otherwise.

    ``first_conv`` and ``classifier`` name the input layer and the classifier (module names; None:
    the first Conv2d and the last Linear), kept dense under ``dense_first`` / ``dense_last``;
    ``dense`` holds fnmatch patterns of module names of more layers kept dense (the default of
    ``exclude``)."""

    first_conv: str | None = None
    classifier: str | None = None
    dense: tuple[str, ...] = ()


class MissingExtra(UserError):
    """A model that needs an optional extra which is not installed (``[timm]``): the line names it."""


_MODELS: dict[str, tuple[ModelFactory, DenseDefaults]] = {}
# keyed by display name, e.g. "wrn-<depth>-<width>"
_FAMILIES: dict[str, tuple[NameParser, ModelFactory, DenseDefaults]] = {}
# factory -> its real-valued option that scales every layer's channels (what thin-dense narrows)
_WIDTH_OPTIONS: dict[ModelFactory, str] = {}


def register_model(
    name: str,
    *,
    parse_name: NameParser | None = None,
    first_conv: str | None = None,
    classifier: str | None = None,
    dense: tuple[str, ...] = (),
    width: str | None = None,
):
    """Decorator registering a model factory under ``name``, with its ``DenseDefaults``.

    With ``parse_name`` the factory serves a family of names (``wrn-28-2``, ``wrn-16-8``, ...): ``name``
    is then only the family's display name, and the options parsed from a name are passed to the factory
    (a pipeline's own options override them). ``width`` names the factory's real-valued option that
    scales every layer's channels: the models thin-dense can narrow have one.
    """
    defaults = DenseDefaults(first_conv, classifier, tuple(dense))

    def decorator(factory: ModelFactory) -> ModelFactory:
        if width is not None:
            _WIDTH_OPTIONS[factory] = width
        if parse_name is None:
            _MODELS[name] = (factory, defaults)
        else:
            _FAMILIES[name] = (parse_name, factory, defaults)
        return factory

    return decorator


def _resolve(name: str) -> tuple[ModelFactory, dict, DenseDefaults]:
    """The factory for ``name``, the options encoded in the name itself, and its dense layers."""
    if name in _MODELS:
        factory, defaults = _MODELS[name]
        return factory, {}, defaults
    for parse_name, factory, defaults in _FAMILIES.values():
        if (options := parse_name(name)) is not None:
            return factory, options, defaults
    if name in torchvision_models.classification_model_names():
        return torchvision_models.build_torchvision_model, {"name": name}, DenseDefaults()
    registered = ", ".join([*_MODELS, *_FAMILIES])
    candidates = [*_MODELS, *torchvision_models.classification_model_names()]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"unknown model '{name}' (known: {registered}, or any torchvision classification model){hint}"
    )


def is_known_model(name: str) -> bool:
    """Whether ``create_model(name, ...)`` would find a model; builds nothing and imports no user
    code. A model whose optional extra is missing raises MissingExtra, which names the extra."""
    try:
        _resolve(name)
    except MissingExtra:
        raise
    except UserError:
        return False
    return True


def width_option(name: str, options: dict) -> tuple[str, float] | None:
    """(option, its value for these options) of the model's width, or None if it has none."""
    factory, name_options, _ = _resolve(name)
    option = _WIDTH_OPTIONS.get(factory)
    if option is None:
        return None
    value = {**name_options, **options}.get(option, inspect.signature(factory).parameters[option].default)
    return option, float(value)


def models_with_width() -> list[str]:
    """The registered models (families by their display name) that have a width option."""
    entries = [(name, factory) for name, (factory, _) in _MODELS.items()]
    entries += [(name, factory) for name, (_, factory, _) in _FAMILIES.items()]
    return [name for name, factory in entries if factory in _WIDTH_OPTIONS]


def list_models() -> list[str]:
    """Registered names (families by their display name), then torchvision classification model names."""
    registered = [*_MODELS, *_FAMILIES]
    return registered + [n for n in torchvision_models.classification_model_names() if n not in registered]


def input_size_refusal(name: str, shape: str, reason: str) -> UserError:
    """The one line for a model that cannot take inputs of `shape` ("3x64x64"), at build or at its
    first forward pass; `dsrpipe check` and the model matrix read its ending."""
    return UserError(
        f"model '{name}' cannot take {shape} inputs ({reason}); set data.image_size to a size it takes"
    )


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: int, **options) -> nn.Module:
    """Build model ``name`` for inputs (N, in_channels, image_size, image_size) and ``num_classes`` outputs."""
    factory, name_options, defaults = _resolve(name)
    try:
        kwargs = dict(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            **{**name_options, **options},
        )
        # Check options against the signature first: a TypeError from inside the build would be a bug, not bad input.
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"bad options for model '{name}': {e}") from None
    model = factory(**kwargs)
    if getattr(model, "dense_defaults", None) is None:  # a family may read them off the model it built (timm)
        model.dense_defaults = defaults
    return model


# Imported last: these modules register their models with the decorator defined above.
from dsrpipe.models import lenet, plain_cnn, small_cnn, timm_models, torchvision_models, user_models, wrn  # noqa: E402, F401
