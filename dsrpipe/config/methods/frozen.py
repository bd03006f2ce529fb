"""frozen: the paper's control: a finished run's final masks retrained statically, from a fresh
init or from that run's own initial weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import Field

from ...checkpoint import read_finished_run
from ...sparse import Frozen, Sparsifier
from ...trained import ModelSpec
from ..schema import FilePath
from .base import MethodOptions


class FrozenOptions(MethodOptions):
    sparsifier: ClassVar[type[Sparsifier]] = Frozen
    source_setting: ClassVar[str | None] = "masks_from"
    starts_from: ClassVar[str | None] = "dsr"

    method: Literal["frozen"] = "frozen"
    sparsity: float = Field(0.9, ge=0.0, lt=1.0)  # the source run's (a label: the masks decide)
    masks_from: (
        FilePath  # a run's train/final.pt (relative to the working directory) whose final masks to retrain
    )
    init: Literal["fresh", "same"] = "fresh"  # a fresh random init, or the source run's own initial weights
    scale_init: bool = False

    def trained_spec(self, configured: ModelSpec, note: Callable[[str], None]) -> ModelSpec:
        """From a run that shrank while it trained: that run's narrower model."""
        option, path = self.source
        source = read_finished_run(path, option)["model_spec"]
        live = source.get("live_channels") if isinstance(source, dict) else None
        return configured.with_live_channels(live) if live else configured
