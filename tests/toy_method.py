"""A method added in one file: 'toy', static sparse training under a name of its own, on a model
half the configured width (its hook). Its options class is the whole method, its sparsifier and
its hook included, registered in one call; nothing else in dsrpipe names it. tests/test_run.py
registers it for its tests only."""

from __future__ import annotations

from typing import ClassVar, Literal

from dsrpipe.config.methods import FromScratchOptions
from dsrpipe.sparse import Sparsifier
from dsrpipe.trained import ModelSpec


class Toy(Sparsifier):
    method = "toy"


class ToyOptions(FromScratchOptions):
    sparsifier: ClassVar[type[Sparsifier]] = Toy

    method: Literal["toy"] = "toy"

    def trained_spec(self, configured: ModelSpec, note) -> ModelSpec:
        narrowed = {**configured.options, "width": configured.options.get("width", 32) // 2}
        note(f"toy: width {narrowed['width']}")
        return configured.at_width(narrowed)
