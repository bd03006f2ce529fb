"""A method added in one file: 'toy', static sparse training under a name of its own, on a model
half the configured width (its hook). Its options, its sparsifier and its hook are registered in
one call; nothing else in dsrpipe names it. tests/test_run.py registers it for its tests only."""

from __future__ import annotations

from typing import Literal

from dsrpipe.config.methods import FromScratchOptions
from dsrpipe.registry import Method
from dsrpipe.sparse import Sparsifier
from dsrpipe.trained import ModelSpec


class ToyOptions(FromScratchOptions):
    method: Literal["toy"] = "toy"


class Toy(Sparsifier):
    method = "toy"


def half_width(spec: ModelSpec, options: ToyOptions, note) -> ModelSpec:
    narrowed = {**spec.options, "width": spec.options.get("width", 32) // 2}
    note(f"toy: width {narrowed['width']}")
    return spec.at_width(narrowed)


TOY = Method(ToyOptions, Toy, model_spec=half_width)
