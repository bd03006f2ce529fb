"""The sparsity section's methods, one module each: a method is its options class (`base.py`'s
`MethodOptions`), which says what the method takes, the library class that trains with it, and
its hooks. Every module of this package but base.py is one built-in method, found here: adding a
method is adding its file (and its test). A method from outside registers its options class
(`register_method`); a grid's runs, processes of their own, know the built-in ones only.

Nothing else in dsrpipe branches on a method's name: what the pipeline needs to know of a method,
its options class answers. dsrpipe.sparsifiers turns the options into the library's sparsifier.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from pydantic import SerializeAsAny

from .base import (
    ChannelRemovalOption,
    ChannelRemovalOptions,
    ChannelShape,
    FromScratchOptions,
    GranularityOption,
    MethodOptions,
    NpOptions,
    PruningSpan,
    RewiringOptions,
    SparseOptions,
)
from .dsr import DSROptions

# The method of a sparsity section that names none.
DEFAULT = DSROptions
# Every method by name: its options class.
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {}
# The sparsity section's type: whichever registered options class its `method` names (chosen by
# `parse_method_options`), written out with that class's own fields.
SparsityOptions = SerializeAsAny[MethodOptions]


def method_name(options: type[MethodOptions]) -> str:
    """The name a method's options class answers to: its `method` field's default."""
    return options.model_fields["method"].default


def register_method(options: type[MethodOptions]) -> None:
    """Add a method, all of it, by its options class: the pipeline schema takes its options from
    then on, and `run` (and a grid's plan) trains it like any other."""
    name = method_name(options)
    if not isinstance(name, str):
        raise TypeError(f"{options.__name__} names no method: its `method` field needs a default")
    if not hasattr(options, "sparsifier"):
        raise TypeError(f"method '{name}' names no sparsifier (its options class's `sparsifier`)")
    if name in METHOD_OPTIONS:
        raise ValueError(f"a method named '{name}' is registered already")
    METHOD_OPTIONS[name] = options


def unregister_method(name: str) -> None:
    """Remove a method `register_method` added."""
    METHOD_OPTIONS.pop(name, None)


def parse_method_options(section: Any) -> MethodOptions:
    """The sparsity section as its method's options; an option the method does not take is an
    error naming it (and the methods that do take it)."""
    if isinstance(section, MethodOptions):
        return section
    if not isinstance(section, dict):
        raise ValueError("expected a mapping of settings")
    method = section.get("method", method_name(DEFAULT))
    if not isinstance(method, str) or method not in METHOD_OPTIONS:
        raise ValueError(f"unknown method '{method}' (known: {', '.join(METHOD_OPTIONS)})")
    options = METHOD_OPTIONS[method]
    for key in section:
        if key not in options.model_fields:
            owners = [m for m, o in METHOD_OPTIONS.items() if key in o.model_fields]
            whose = f"an option of {', '.join(owners)}" if owners else "no method's option"
            raise ValueError(
                f"method '{method}' takes no option '{key}' ({whose}; {method} takes: "
                f"{', '.join(k for k in options.model_fields if k != 'method')})"
            )
    return options.model_validate({**section, "method": method})


def switch_method(section: dict[str, Any], method: str) -> dict[str, Any]:
    """A sparsity section switched to another method, as `dsrpipe compare` runs one base pipeline
    with every method of a grid: options only other methods take are dropped; the method's own,
    and keys no method knows (validation names them), are kept."""
    own = METHOD_OPTIONS[method].model_fields
    known = {k for options in METHOD_OPTIONS.values() for k in options.model_fields}
    return {**{k: v for k, v in section.items() if k in own or k not in known}, "method": method}


def _options_of(module: ModuleType) -> type[MethodOptions]:
    """The options class a method's module defines: one, the method's (the option groups that
    several methods share are base.py's)."""
    defined = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, MethodOptions)
        and value.__module__ == module.__name__
    ]
    if len(defined) != 1:
        raise ImportError(f"{module.__name__} defines {len(defined)} method options classes, not one")
    return defined[0]


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        register_method(_options_of(importlib.import_module(f"{__name__}.{_module.name}")))

__all__ = [
    "DEFAULT",
    "METHOD_OPTIONS",
    "ChannelRemovalOption",
    "ChannelRemovalOptions",
    "ChannelShape",
    "FromScratchOptions",
    "GranularityOption",
    "MethodOptions",
    "NpOptions",
    "PruningSpan",
    "RewiringOptions",
    "SparseOptions",
    "SparsityOptions",
    "method_name",
    "parse_method_options",
    "register_method",
    "switch_method",
    "unregister_method",
]
