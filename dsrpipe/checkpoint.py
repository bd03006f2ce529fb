"""dsrpipe's checkpoints: what one holds, and reading one without unpickling anything.

Checkpoints hold only tensors and plain data (numbers, strings, lists, dicts) and are read with
`torch.load(weights_only=True)`: a file planted in an output folder or named by `masks_from` is
refused as "not a dsrpipe checkpoint", and nothing in it is ever executed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import files
from .errors import UserError
from .files import not_a_checkpoint

CHECKPOINT_FORMAT = 2  # 1 (dsrpipe 0.1.0) pickled the RNG states: no longer read
CHECKPOINT_FIELDS = {
    "format": int,
    "stage": str,
    "complete": bool,
    "fingerprint": str,
    "run_id": str,
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "sparsifier": dict,
    "method": str,
    "rng": dict,
    "history": list,
    "model_spec": dict,
    "data_info": dict,
    "config": dict,
}


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    """torch.save, atomically (files.atomic_path)."""
    with files.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path: str | os.PathLike) -> Any:
    """A torch.save file read as data only (`weights_only`: tensors and plain containers, never
    code) and memory-mapped (a big file costs address space, not memory, until read): for any
    file a user or a drop names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the pickle protocol of foreign files
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    torch_save(path, {"format": CHECKPOINT_FORMAT, **checkpoint})


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint dsrpipe wrote. Only tensors and plain data are unpickled, whatever the file
    holds, so loading runs no code; anything else is a one-line UserError."""
    path = Path(path)
    try:
        checkpoint = torch_load(path)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # whatever a foreign, truncated or hostile file makes the loader raise
        raise not_a_checkpoint(path, exc) from None
    if not isinstance(checkpoint, dict):
        raise not_a_checkpoint(path, f"it holds a {type(checkpoint).__name__}, not a dict")
    wrong = [key for key, kind in CHECKPOINT_FIELDS.items() if not isinstance(checkpoint.get(key), kind)]
    if wrong:
        raise not_a_checkpoint(path, f"missing or malformed: {', '.join(wrong)}")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise not_a_checkpoint(path, f"format {checkpoint['format']}, this dsrpipe reads {CHECKPOINT_FORMAT}")
    return checkpoint


@contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Restore state from a loaded checkpoint: contents that do not fit where they go (a planted
    file with the right keys and the wrong insides) are refused like any foreign file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise not_a_checkpoint(path, exc) from None


def read_finished_run(path: str | Path, option: str) -> dict[str, Any]:
    """The final checkpoint of a finished dsrpipe training run that the setting `option` names
    (masks_from, prune_from), read without unpickling (an untrusted file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option}: no checkpoint at {path} (expected a run's train/final.pt)")
    try:
        checkpoint = torch_load(path)
    except Exception as exc:  # whatever a foreign, truncated or hostile file makes the loader raise
        raise UserError(f"{option}: {not_a_checkpoint(path, exc)}") from None
    if not (
        isinstance(checkpoint, dict)
        and isinstance(checkpoint.get("sparsifier"), dict)
        and isinstance(checkpoint["sparsifier"].get("masks"), dict)
        and isinstance(checkpoint.get("model"), dict)
    ):
        raise UserError(f"{option}: {not_a_checkpoint(path, 'not a training run: no model and masks')}")
    if checkpoint.get("complete") is False:
        raise UserError(f"{option}: {path} is an unfinished run; use its final.pt")
    return checkpoint
