"""What training records, typed: the spec that rebuilds a model, and a stage's checkpoint.

Both go to disk as the plain dicts they always were (`to_dict`; checkpoints are read without
unpickling anything, see dsrpipe.checkpoint), so runs made before these types existed resume and
export unchanged. Malformed contents raise KeyError or TypeError, which `checkpoint.restoring`
turns into "not a dsrpipe checkpoint".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .models import create_model
from .sparse.slicing import cut_to_live


@dataclass(frozen=True)
class ModelSpec:
    """The model a stage trains: a registered model, its options and input shape; a thin-dense
    run's narrowing (`thin_dense`: its parameters and the budget they stand for), and a run that
    shrank while it trained, its live channels (the original indices, by layer)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    options: dict[str, Any]
    live_channels: dict[str, list[int]] | None = None
    thin_dense: dict[str, int] | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not known >= set(raw):
            raise TypeError(f"a model spec holds {', '.join(sorted(known))}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """The spec as checkpoints have always held it: the optional keys only where set."""
        raw = {
            "name": self.name,
            "options": self.options,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
        }
        if self.thin_dense is not None:
            raw["thin_dense"] = self.thin_dense
        if self.live_channels is not None:
            raw["live_channels"] = self.live_channels
        return raw

    def with_live_channels(self, live: dict[str, list[int]]) -> ModelSpec:
        return replace(self, live_channels=live)

    def at_width(self, options: dict[str, Any]) -> ModelSpec:
        """The same model at other options and its full width: what a thin-dense model stands in
        for, or a shrunk one started as."""
        return replace(self, options=options, live_channels=None, thin_dense=None)

    def blank_input(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """One blank input of the model's shape: what tracing and MAC counting run on."""
        return torch.zeros(1, self.in_channels, self.image_size, self.image_size, device=device)

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model the spec describes, cut to its live channels if it shrank while it trained."""
        model = create_model(
            self.name,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
            **self.options,
        ).to(device)
        if self.live_channels:
            cut_to_live(model, self.blank_input(device), self.live_channels)
        return model


def build_model(spec: ModelSpec | dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model a spec (or a checkpoint's `model_spec` dict) describes."""
    return (spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)).build(device)


@dataclass
class Checkpoint:
    """A training stage's checkpoint (last.pt after each epoch, final.pt once complete): what
    resumes it bit for bit, and what the later stages build on."""

    stage: str
    complete: bool
    fingerprint: str
    run_id: str
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    sparsifier: dict[str, Any]  # the sparsifier's own state_dict (masks, channels, ...)
    method: str
    rng: dict[str, Any]
    history: list[dict[str, Any]]
    # The model spec as recorded (`model_spec` is it typed): read when the model is built, so that
    # a planted file fails where its contents are restored, in the order they are.
    recorded_spec: dict[str, Any]
    data_info: dict[str, Any]
    config: dict[str, Any]
    world_size: int = 1  # the processes that trained it; older checkpoints were all one process
    job: str | None = None  # the torchrun job that wrote it
    init: dict[str, Any] = field(default_factory=dict)  # what frozen's `init: same` starts from

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.recorded_spec)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Checkpoint:
        """A checkpoint as `checkpoint.load_checkpoint` returns it (the field types checked there)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in raw.items() if key in known}
        return cls(**values, recorded_spec=raw["model_spec"])

    def to_dict(self) -> dict[str, Any]:
        """What `checkpoint.save_checkpoint` writes: the keys and values it always held."""
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "recorded_spec"}
        raw["model_spec"] = self.recorded_spec
        return raw
