"""Model zoo: a timm-style name -> factory registry, falling back to any torchvision classification model.

A factory is called as ``fn(*, num_classes, in_channels, image_size, **options)`` and returns a module
mapping normalised float NCHW input ``(N, in_channels, image_size, image_size)`` to logits
``(N, num_classes)``. Conventions the sparsifier and exporter rely on: plain nn.Conv2d / nn.Linear /
nn.BatchNorm2d modules (no functional or shared weights); the first Conv2d (first Linear for MLPs) in
``named_modules()`` order is the input layer, and the last nn.Linear is the classifier.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from dsrpipe.errors import UserError

ModelFactory = Callable[..., nn.Module]
# Maps a name to the options it encodes, None if the name is not in the family; raises UserError
# for a name that is in the family but invalid (e.g. a WRN depth that is not 6n+4).
NameParser = Callable[[str], "dict | None"]

_MODELS: dict[str, ModelFactory] = {}
_FAMILIES: dict[str, tuple[NameParser, ModelFactory]] = {}  # keyed by display name, e.g. "wrn-<depth>-<width>"


def register_model(name: str, *, parse_name: NameParser | None = None):
    """Decorator registering a model factory under ``name``.

    With ``parse_name`` the factory serves a family of names (``wrn-28-2``, ``wrn-16-8``, ...): ``name``
    is then only the family's display name, and the options parsed from a name are passed to the factory.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if parse_name is None:
            _MODELS[name] = factory
        else:
            _FAMILIES[name] = (parse_name, factory)
        return factory

    return decorator


def _resolve(name: str) -> tuple[ModelFactory, dict]:
    """The factory for ``name`` and the options encoded in the name itself."""
    if name in _MODELS:
        return _MODELS[name], {}
    for parse_name, factory in _FAMILIES.values():
        if (options := parse_name(name)) is not None:
            return factory, options
    if name in torchvision_models.classification_model_names():
        return torchvision_models.build_torchvision_model, {"name": name}
    registered = ", ".join([*_MODELS, *_FAMILIES])
    candidates = [*_MODELS, *torchvision_models.classification_model_names()]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown model '{name}' (known: {registered}, or any torchvision classification model){hint}")


def is_known_model(name: str) -> bool:
    """Whether ``create_model(name, ...)`` would find a model; builds nothing."""
    try:
        _resolve(name)
    except UserError:
        return False
    return True


def list_models() -> list[str]:
    """Registered names (families by their display name), then torchvision classification model names."""
    registered = [*_MODELS, *_FAMILIES]
    return registered + [n for n in torchvision_models.classification_model_names() if n not in registered]


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: int, **options) -> nn.Module:
    """Build model ``name`` for inputs (N, in_channels, image_size, image_size) and ``num_classes`` outputs."""
    factory, name_options = _resolve(name)
    try:
        kwargs = dict(
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, **name_options, **options
        )
        # Check options against the signature first: a TypeError from inside the build would be a bug, not bad input.
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"bad options for model '{name}': {e}") from None
    return factory(**kwargs)


# Imported last: these modules register their models with the decorator defined above.
from dsrpipe.models import lenet, small_cnn, torchvision_models, wrn  # noqa: E402, F401
