"""Image folders (a folder, or a .tar.gz/.tgz/.tar/.zip archive, of train/ and test/ class
folders): listed, unpacked safely (archive.py) and decoded once into a cache; sets too big for
memory (ImageNet) are streamed from disk by DataLoader workers instead."""

from __future__ import annotations

import multiprocessing
import signal
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..catalog import find_splits, visible_dirs
from ..checkpoint import torch_save
from ..contract import IMAGE_SUFFIXES, decode_fitted
from ..errors import UserError
from .archive import ArchiveCaps, cache_key, extract_archive
from .splits import DatasetInfo, StreamingDataset, channel_stats, in_memory_splits

# A decoded image folder bigger than this is streamed from disk rather than held in memory.
MAX_IN_MEMORY_BYTES = 4 * 2**30

DECODE_CHUNK = 512  # images per task sent to a decoding worker process

# data.image_size unset: images are fitted to the median side of a sample, within these bounds.
AUTO_SIDES, MEDIAN_SAMPLE = (8, 256), 99
CACHE_VERSION = 1  # bump when the decoded-cache layout or decoding changes

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_imagefolder(root, image_size, cache_dir: Path, num_workers: int, archive_caps: ArchiveCaps):
    if root is None:
        raise UserError(
            "dataset 'imagefolder': set data.root to a folder or archive "
            "holding train/ and test/ class folders"
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"dataset 'imagefolder': {path} does not exist")
    if path.is_file():
        path = extract_archive(path, cache_dir / "archives", archive_caps)
    splits = find_splits(path)
    if splits is None:
        raise UserError(f"dataset 'imagefolder': {path} holds no train/ and test/ (or val/) folders")
    train_dir, test_dir = splits
    classes = _class_folders(train_dir)
    if not classes:
        raise UserError(f"dataset 'imagefolder': no class folders in {train_dir}")
    if set(test_classes := _class_folders(test_dir)) != set(classes):
        raise UserError(
            f"dataset 'imagefolder': {test_dir} has classes {sorted(test_classes)} "
            f"but {train_dir} has {classes}"
        )
    train_files, test_files = _list_images(train_dir, classes), _list_images(test_dir, classes)
    size = image_size or median_side(train_files)

    if len(train_files) * 3 * size * size > MAX_IN_MEMORY_BYTES:
        info = DatasetInfo("imagefolder", len(classes), 3, size, _IMAGENET_MEAN, _IMAGENET_STD, classes)
        return (
            StreamingDataset(info, _ImageFiles(train_files), num_workers),
            StreamingDataset(info, _ImageFiles(test_files), num_workers),
        )

    files = train_files + test_files
    key = cache_key(
        CACHE_VERSION,
        str(path.resolve()),
        size,
        [(str(p), st.st_size, st.st_mtime_ns) for p, _ in files for st in [p.stat()]],
    )
    cache_file = cache_dir / "decoded" / f"{path.name}-{key}.pt"
    cached = _read_cache(cache_file)
    if cached is None:
        images = _decode_images([p for p, _ in files], size, num_workers)
        labels = torch.tensor([label for _, label in files])
        n = len(train_files)
        cached = {
            "train": (images[:n], labels[:n]),
            "test": (images[n:], labels[n:]),
            "stats": channel_stats(images[:n]),
        }
        torch_save(cache_file, cached)
    (train_x, train_y), (test_x, test_y) = cached["train"], cached["test"]
    return in_memory_splits("imagefolder", classes, train_x, train_y, test_x, test_y, stats=cached["stats"])


def _read_cache(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # truncated or from an incompatible version: decode again
        return None


def _class_folders(split: Path) -> list[str]:
    return [p.name for p in visible_dirs(split)]


def _list_images(split: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        images = sorted(
            p for p in (split / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not images:
            raise UserError(f"dataset 'imagefolder': class folder {split / name} holds no images")
        files += [(p, label) for p in images]
    return files


def median_side(files: list[tuple[Path, int]]) -> int:
    """The side images are fitted to when data.image_size is not set: the median short side of up
    to MEDIAN_SAMPLE training images spread evenly over the set (their headers only), within
    AUTO_SIDES. The files are listed class by class, so the sample takes in every class, each in
    proportion to its images (a stride of len // MEDIAN_SAMPLE, cut at MEDIAN_SAMPLE files, left
    the last classes out: all of them in a set of fewer than twice as many files)."""
    count = len(files)
    sample = (
        [files[i * count // MEDIAN_SAMPLE] for i in range(MEDIAN_SAMPLE)] if count > MEDIAN_SAMPLE else files
    )
    sides = sorted(_short_side(path) for path, _ in sample)
    return min(max(sides[len(sides) // 2], AUTO_SIDES[0]), AUTO_SIDES[1])


def _short_side(path: Path) -> int:
    try:
        with Image.open(path) as img:
            return min(img.size)
    except Exception as e:
        raise UserError(f"dataset 'imagefolder': cannot decode {path}: {e}") from None


def _decode_images(paths: list[Path], size: int, num_workers: int) -> torch.Tensor:
    """Decode every image once into (N, C, size, size) uint8: C = 1 if all are grey, else 3."""
    chunks = [paths[i : i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    decode = partial(_decode_chunk, size=size)
    if num_workers > 1 and len(chunks) > 1:
        # Processes, not threads: small images spend their time in PIL's Python code (the GIL).
        # fork starts workers at once; they run only PIL and numpy, never torch.
        with multiprocessing.get_context("fork").Pool(min(num_workers, len(chunks)), _quiet_worker) as pool:
            arrays = [a for chunk in pool.imap(decode, chunks) for a in chunk]
    else:
        arrays = [a for chunk in chunks for a in decode(chunk)]
    if all(a.ndim == 2 for a in arrays):
        return torch.from_numpy(np.stack(arrays)[:, None])
    colour = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
    return torch.from_numpy(np.stack(colour)).permute(0, 3, 1, 2).contiguous()


def _quiet_worker() -> None:
    # The pool ends its workers with SIGTERM: the parent's handler (a clean exit with a message)
    # would make each one print a traceback.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _decode_chunk(paths: list[Path], size: int) -> list[np.ndarray]:
    """Each image as (size, size) grey or (size, size, 3) RGB uint8."""
    return [
        decode_fitted(path, size, size, grey=None, failed="dataset 'imagefolder': cannot decode")
        for path in paths
    ]


def _open_rgb(path: str):
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise UserError(f"dataset 'imagefolder': cannot decode {path}: {e}") from None


class _ImageFiles(torch.utils.data.Dataset):
    """torchvision's ImageFolder over our own listing, so both paths agree on classes and files."""

    def __init__(self, files: list[tuple[Path, int]]):
        self.files, self.transform = files, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        return self.transform(_open_rgb(path)), label
