"""static: a fixed random mask, nothing moves (the library's base Sparsifier)."""

from __future__ import annotations

from typing import ClassVar, Literal

from ...sparse import Sparsifier
from .base import ChannelRemovalOption, FromScratchOptions, GranularityOption


class StaticOptions(ChannelRemovalOption, GranularityOption, FromScratchOptions):
    sparsifier: ClassVar[type[Sparsifier]] = Sparsifier

    method: Literal["static"] = "static"
