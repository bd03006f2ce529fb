"""Sparse-training methods behind one optimizer-like interface, selected by name."""

from __future__ import annotations

import inspect

from ..errors import UserError
from .base import Dense, RewireSchedule, Sparsifier, proportional_split, sample_free_positions
from .deepr import DeepR
from .dsr import DSR
from .frozen import Frozen
from .prune import GradualPrune
from .rigl import RigL
from .set import SET

# "thin-dense" trains densely like "dense", on a narrower model with the sparse budget (see thin.py).
METHODS: dict[str, type[Sparsifier]] = {
    "dense": Dense, "static": Sparsifier, "dsr": DSR, "set": SET, "deepr": DeepR, "rigl": RigL,
    "prune": GradualPrune, "frozen": Frozen, "thin-dense": Dense,
}


def create_sparsifier(method: str, model, optimizer=None, **options) -> Sparsifier:
    """Build a method by name; options a method does not take (e.g. `prune_target` for static)
    are ignored, so one pipeline config can switch methods freely."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise UserError(f"unknown method '{method}' (known: {', '.join(METHODS)})") from None
    accepted = {
        name for klass in cls.__mro__ if klass is not object for name in inspect.signature(klass.__init__).parameters
    }
    return cls(model, optimizer, **{k: v for k, v in options.items() if k in accepted})


__all__ = [
    "DSR", "SET", "DeepR", "Dense", "Frozen", "GradualPrune", "METHODS", "RewireSchedule", "RigL", "Sparsifier",
    "create_sparsifier", "proportional_split", "sample_free_positions",
]
