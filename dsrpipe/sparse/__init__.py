"""Sparse-training methods behind one optimizer-like interface, selected by name."""

from __future__ import annotations

import inspect

from ..errors import UserError
from .base import Dense, RewireSchedule, Sparsifier
from .budgets import layer_budgets, proportional_split, sample_free_positions, split_in_units
from .deepr import DeepR
from .dsr import DSR
from .frozen import Frozen
from .layers import LayerSelection
from .prune import ChannelPrune, GradualPrune, Prune
from .removal import ChannelRemoval
from .rigl import RigL
from .set import SET
from .units import GRANULARITIES, Units

# "thin-dense" trains densely like "dense", on a narrower model with the sparse budget (see thin.py).
METHODS: dict[str, type[Sparsifier]] = {
    "dense": Dense,
    "static": Sparsifier,
    "dsr": DSR,
    "set": SET,
    "deepr": DeepR,
    "rigl": RigL,
    "prune": Prune,
    "prune-channels": ChannelPrune,
    "gmp": GradualPrune,
    "frozen": Frozen,
    "thin-dense": Dense,
}


def method_options(cls: type[Sparsifier]) -> list[str]:
    """The keyword options a method's constructor takes, its parents' included where it passes
    them on (**kwargs)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def create_sparsifier(method: str, model, optimizer=None, **options) -> Sparsifier:
    """Build a method by name with its own options; an option it does not take is an error."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise UserError(f"unknown method '{method}' (known: {', '.join(METHODS)})") from None
    known = method_options(cls)
    for name in options:
        if name not in known:
            raise UserError(f"method '{method}' takes no option '{name}' (its options: {', '.join(known)})")
    return cls(model, optimizer, **options)


__all__ = [
    "DSR",
    "ChannelPrune",
    "ChannelRemoval",
    "GRANULARITIES",
    "SET",
    "DeepR",
    "Dense",
    "Frozen",
    "GradualPrune",
    "LayerSelection",
    "METHODS",
    "Prune",
    "RewireSchedule",
    "RigL",
    "Sparsifier",
    "Units",
    "create_sparsifier",
    "layer_budgets",
    "method_options",
    "proportional_split",
    "sample_free_positions",
    "split_in_units",
]
