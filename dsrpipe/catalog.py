"""The datasets dsrpipe knows by name, and what an image-folder dataset looks like on disk.
Torch-free: config validates names with it, dsrpipe.data reads datasets by these rules, and the
watch daemon (which never imports torch) decides with them what a drop is."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

KNOWN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def archive_suffix(name: str) -> str:
    """The archive suffix `name` ends with (any case), or "" if it is not a dataset archive."""
    lower = name.lower()
    return next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), "")


def visible_dirs(folder: Path) -> list[Path]:
    """Subfolders, sorted, without hidden ones and macOS's __MACOSX litter."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def find_splits(folder: Path) -> tuple[Path, Path] | None:
    """train/ and test/ (or val/) in `folder`, or in its only subfolder (as in cifar10/train/...)."""
    subfolders = visible_dirs(folder)
    for candidate in [folder] + (subfolders if len(subfolders) == 1 else []):
        test = next((candidate / n for n in ("test", "val") if (candidate / n).is_dir()), None)
        if (candidate / "train").is_dir() and test:
            return candidate / "train", test
    return None


def dataset_needs_root(name: str) -> bool:
    """Whether `name` reads files (and so needs data.root); raises UserError for unknown names."""
    return check_dataset(name) != "digits"


def check_dataset(name: str) -> str:
    if name not in KNOWN_DATASETS:
        raise UserError(f"unknown dataset '{name}' (known: {', '.join(KNOWN_DATASETS)})")
    return name
