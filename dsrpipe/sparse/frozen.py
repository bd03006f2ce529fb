"""The DSR paper's control: the final structure a dynamic run found, retrained statically.

Loads the final masks of a finished dsrpipe run (`masks_from`: its `<out>/<name>/train/final.pt`)
and trains on exactly those masks, which never change, starting from
  init: fresh   a fresh random initialisation (the default), or
  init: same    the source run's own initial weights (the model before its first step).
The paper ran both. Either way the source's model is rebuilt from what its checkpoint records
(`model_spec`; for `same` the seed it was initialised from, checked against the digest of the
initial weights the run recorded), so the model passed in must be that model: its weights are
replaced. A source that shrank while it trained (channel removal) is retrained as the narrower
model it ended as, from its initial weights at the channels that were left. Unlike DSR nothing
moves; unlike `static` the (non-uniform) mask was learnt. If it does
worse than the run it came from, exploring structure during training is what mattered.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import read_finished_run
from ..errors import UserError
from ..models import create_model
from .base import Sparsifier
from .layers import LayerSelection
from .slicing import cut_to_live

INITS = ("fresh", "same")


def state_digest(model: nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def initial_weights(model: nn.Module, seed: int) -> dict[str, Any]:
    """What a training checkpoint records of its freshly built model, for `init: same`: the seed it
    was built from (`torch.manual_seed(seed)` before `create_model`) and the digest of its weights."""
    return {"seed": seed, "digest": state_digest(model)}


def _rebuild(spec: dict[str, Any], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        return create_model(
            spec["name"],
            num_classes=spec["num_classes"],
            in_channels=spec["in_channels"],
            image_size=spec["image_size"],
            **spec["options"],
        )


def _fresh_seed(seed: int, source_seed: int | None) -> int:
    """A seed for a fresh initialisation, derived from the run's own and never the source's."""
    fresh = int.from_bytes(hashlib.sha256(f"dsrpipe frozen fresh init {seed}".encode()).digest()[:7], "big")
    return fresh + 1 if fresh == source_seed else fresh


class Frozen(Sparsifier):
    method = "frozen"
    granularities = ("element",)  # the masks come as they are

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        masks_from: str | Path | None = None,
        init: str = "fresh",
        layers: LayerSelection | None = None,
        seed: int = 0,
        scale_init: bool = False,
    ):
        if masks_from is None:
            raise UserError(
                "method 'frozen' needs masks_from: the final.pt of the run whose masks to retrain"
            )
        if init not in INITS:
            raise UserError(f"frozen: init must be one of {', '.join(INITS)}, got '{init}'")
        source = read_finished_run(masks_from, "masks_from")
        masks = source["sparsifier"]["masks"]
        if not masks:
            raise UserError(f"masks_from: {masks_from} has no masks (a dense run?)")
        self.init = init
        self._source, self._source_path = masks, masks_from
        self._initialise(model, source, seed)
        active = sum(int(m.sum()) for m in masks.values())
        sparsity = 1 - active / sum(m.numel() for m in masks.values())  # as found
        super().__init__(model, optimizer, sparsity=sparsity, layers=layers, seed=seed, scale_init=scale_init)
        if set(masks) != set(self.masks):
            raise UserError(
                f"masks_from: {masks_from} has masks for layers {sorted(masks)}, but this "
                f"model's sparse layers are {sorted(self.masks)} (same model, dense_first, "
                "dense_last, exclude and sparse_tensors?)"
            )
        del self._source

    def _initialise(self, model: nn.Module, source: dict[str, Any], seed: int) -> None:
        """Give `model` the source model's initial weights (`same`) or fresh ones."""
        path, spec, record = self._source_path, source.get("model_spec"), source.get("init")
        if not isinstance(spec, dict):
            raise UserError(
                f"masks_from: {path} does not record its model (made by an older dsrpipe?): retrain it"
            )
        if self.init == "same" and not isinstance(record, dict):
            raise UserError(
                f"masks_from: {path} does not record its initial weights (made by an older "
                "dsrpipe?): retrain it, or use init: fresh"
            )
        source_seed = record.get("seed") if isinstance(record, dict) else None
        built = _rebuild(spec, source_seed if self.init == "same" else _fresh_seed(seed, source_seed))
        if self.init == "same" and state_digest(built) != record.get("digest"):
            raise UserError(
                f"masks_from: rebuilding {path}'s initial weights gave other values "
                "(another torch or torchvision version?): use init: fresh"
            )
        # A source that shrank while it trained: its structure is the narrower model it ended as.
        if spec.get("live_channels"):
            blank = torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])
            cut_to_live(built, blank, spec["live_channels"])
        state, initial = model.state_dict(), built.state_dict()
        if set(state) != set(initial) or any(state[k].shape != initial[k].shape for k in state):
            raise UserError(
                f"masks_from: {path} was trained with another model ({spec['name']}, options "
                f"{spec['options']}) than this one"
            )
        model.load_state_dict(initial)

    def initial_mask(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        mask = self._source.get(name)
        if mask is None or mask.shape != weight.shape:
            found = "no mask" if mask is None else f"a mask of shape {tuple(mask.shape)}"
            raise UserError(
                f"masks_from: {self._source_path} has {found} for layer '{name}' "
                f"(weight shape {tuple(weight.shape)}): was it trained with this model?"
            )
        return mask.to(device=weight.device, dtype=torch.bool).clone()
