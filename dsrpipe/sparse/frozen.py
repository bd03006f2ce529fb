"""The DSR paper's control: the final structure a dynamic run found, retrained statically.

Loads the masks of a finished dsrpipe run (`masks_from`: its `<out>/<name>/train/final.pt`) and
trains the model from a fresh random initialisation on exactly those masks, which never change.
Unlike DSR nothing moves; unlike `static` the (non-uniform) mask was learnt. If it does worse
than the run it came from, exploring structure during training is what mattered.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..rundir import load_checkpoint
from .base import Sparsifier


def load_source(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The final masks stored in a dsrpipe training checkpoint, and the run's id. The file is
    read as data only (see dsrpipe.rundir): a hostile one is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"masks_from: no checkpoint at {path} (expected a run's train/final.pt)")
    try:
        checkpoint = load_checkpoint(path)
    except UserError as exc:
        raise UserError(f"masks_from: {exc}") from None
    masks = checkpoint["sparsifier"].get("masks")
    if not isinstance(masks, dict) or not all(isinstance(m, torch.Tensor) for m in masks.values()):
        raise UserError(f"masks_from: {path} is not a dsrpipe checkpoint (no masks in its sparsifier state)")
    if not checkpoint["complete"]:
        raise UserError(f"masks_from: {path} is an unfinished run; use its final.pt")
    if not masks:
        raise UserError(f"masks_from: {path} has no masks (a dense run?)")
    return masks, checkpoint["run_id"]


class Frozen(Sparsifier):
    method = "frozen"

    def __init__(self, model, optimizer=None, *, masks_from: str | Path | None = None, **kwargs):
        if masks_from is None:
            raise UserError("method 'frozen' needs masks_from: the final.pt of the run whose masks to retrain")
        self._source, _ = load_source(masks_from)
        self._source_path = masks_from
        active = sum(int(m.sum()) for m in self._source.values())
        kwargs["sparsity"] = 1 - active / sum(m.numel() for m in self._source.values())  # as found
        super().__init__(model, optimizer, **kwargs)
        if set(self._source) != set(self.masks):
            raise UserError(f"masks_from: {masks_from} has masks for layers {sorted(self._source)}, but this "
                            f"model's sparse layers are {sorted(self.masks)} (same model, dense_first, "
                            "dense_last and exclude?)")
        del self._source

    def initial_mask(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        mask = self._source.get(name)
        if mask is None or mask.shape != weight.shape:
            found = "no mask" if mask is None else f"a mask of shape {tuple(mask.shape)}"
            raise UserError(f"masks_from: {self._source_path} has {found} for layer '{name}' "
                            f"(weight shape {tuple(weight.shape)}): was it trained with this model?")
        return mask.to(device=weight.device, dtype=torch.bool).clone()
