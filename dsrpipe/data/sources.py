"""The datasets dsrpipe knows by name, read into in-memory splits: scikit-learn's digits (the
embedded default), torchvision's MNIST, Fashion-MNIST and CIFAR, and image folders (folders.py)."""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from .. import machine
from ..catalog import check_dataset
from ..errors import UserError
from ..files import read_regular, shown, unreadable_because
from .archive import ArchiveCaps
from .folders import load_imagefolder
from .splits import Dataset, at_most, in_memory_splits

DEFAULT_CACHE_DIR = "~/.cache/dsrpipe"

# torchvision class name, name in messages
_TORCHVISION_SETS = {
    "mnist": ("MNIST", "MNIST"),
    "fashion-mnist": ("FashionMNIST", "Fashion-MNIST"),
    "cifar10": ("CIFAR10", "CIFAR-10"),
    "cifar100": ("CIFAR100", "CIFAR-100"),
}


def load_data(
    dataset: str,
    *,
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    archive_caps: ArchiveCaps = ArchiveCaps(),
) -> tuple[Dataset, Dataset]:
    """Load (train, test) splits of `dataset`; see KNOWN_DATASETS. `max_train`/`max_test` keep
    a random subset of that many images of a split, the same one whatever the run's seed.
    `archive_caps`: what an image-folder archive may unpack to."""
    train, test = _load_splits(dataset, root, download, image_size, cache_dir, num_workers, archive_caps)
    return at_most(train, max_train), at_most(test, max_test)


def _load_splits(
    dataset, root, download, image_size, cache_dir, num_workers, archive_caps
) -> tuple[Dataset, Dataset]:
    name = check_dataset(dataset)
    if image_size is not None and image_size < 1:
        raise UserError(f"dataset '{name}': image_size must be a positive integer, got {image_size}")
    num_workers = machine.cores() if num_workers is None else num_workers
    if name == "imagefolder":
        cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
        return load_imagefolder(root, image_size, cache, num_workers, archive_caps)
    if name == "digits":
        (train_x, train_y), (test_x, test_y) = _read_digits()
        classes, max_value = [str(i) for i in range(10)], 16
    else:
        (train_x, train_y), (test_x, test_y), classes = _read_torchvision(name, root, download)
        max_value = 255
    if image_size is not None and image_size != train_x.shape[-1]:
        train_x, test_x = _resize(train_x, image_size, max_value), _resize(test_x, image_size, max_value)
    return in_memory_splits(name, classes, train_x, train_y, test_x, test_y, max_value=max_value)


def _resize(images: torch.Tensor, size: int, max_value: int) -> torch.Tensor:
    out = [
        F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        .round_()
        .clamp_(0, max_value)
        .to(torch.uint8)
        for chunk in images.split(4096)
    ]  # chunks bound the float copy's memory
    return torch.cat(out)


def _read_digits():
    # scikit-learn here, not at the top: it takes about a second to import, and no other dataset
    # needs it (a process that trains on MNIST, CIFAR or image folders never loads it).
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # values 0..16, kept as they are and scaled by 1/16 (max_value)
    x = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    y = torch.from_numpy(digits.target).long()
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return (train_x, train_y), (test_x, test_y)


def _read_torchvision(name: str, root: str | None, download: bool):
    class_name, title = _TORCHVISION_SETS[name]
    if root is None:
        raise UserError(f"dataset '{name}': set data.root to a folder for the {title} files")
    root = str(Path(root).expanduser())
    if name in ("cifar10", "cifar100"):
        return _read_cifar(getattr(torchvision.datasets, class_name), title, root, download)
    splits = []
    for train in (True, False):
        try:
            ds = getattr(torchvision.datasets, class_name)(root, train=train, download=download)
        except (RuntimeError, OSError) as e:
            if download:
                raise UserError(f"dataset '{name}': download into {root} failed: {e}") from None
            raise UserError(
                f"dataset '{name}': no {title} files under {root} (set data.root, or download: true)"
            ) from None
        images = torch.as_tensor(ds.data)
        images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # grey / HWC
        splits.append((images.contiguous(), torch.as_tensor(ds.targets).long()))
    # MNIST's own class names read '0 - zero'; plain digits match the 'digits' set.
    classes = [str(i) for i in range(10)] if name == "mnist" else list(ds.classes)
    return splits[0], splits[1], classes


CIFAR_BATCH_BYTES = 200 * 2**20  # a CIFAR python batch is ~31 MB (CIFAR-100's train file ~158 MB)


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds plain containers and numpy arrays, and nothing else: the globals
    a pickled ndarray needs are the only ones it resolves (as torch's weights_only loader does)."""

    def find_class(self, module: str, name: str) -> Any:
        rebuild = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy keeps it
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): rebuild,  # as numpy 1 named it (CIFAR's files)
            ("numpy._core.multiarray", "_reconstruct"): rebuild,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,  # how Python 3 pickles bytes at protocol 2
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return allowed[module, name]


def load_arrays_pickle(path: str | os.PathLike, what: str, limit: int) -> Any:
    """A pickle of plain data and numpy arrays (the format of CIFAR's python batches), at most
    `limit` bytes, read without running anything it names: any other global is a UserError."""
    data = read_regular(path, what, limit, follow=True)
    try:
        return _ArraysOnly(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # whatever a foreign or hostile file makes the unpickler raise
        raise UserError(f"{what} {shown(path)} cannot be read ({unreadable_because(exc)})") from None


def _read_cifar(cls, title: str, root: str, download: bool):
    """CIFAR-10/100 from torchvision's python batches, as torchvision lays them out and checks
    them (md5), but without its pickle.load: a file under data.root is the user's, so it is read
    with an unpickler that builds plain data and numpy arrays only (load_arrays_pickle)."""
    folder = Path(root) / cls.base_folder
    listed = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    if download and not all(check_integrity(str(folder / f), md5) for f, md5 in listed):
        try:
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except (RuntimeError, OSError) as e:
            raise UserError(f"dataset '{title}': download into {root} failed: {e}") from None
    return _read_cifar_batches(folder, cls.train_list, cls.test_list, cls.meta, title)


def _read_cifar_batches(folder: Path, train_list, test_list, meta: dict, title: str):
    """The train and test splits and the class names of CIFAR python batches in `folder`, each
    file checked against its listed md5 first."""

    def read(file_name: str, md5: str) -> dict:
        path = folder / file_name
        if not check_integrity(str(path), md5):
            raise UserError(
                f"dataset '{title}': no {title} files under {folder.parent} (set data.root, or download: true)"
            )
        entry = load_arrays_pickle(path, f"{title} file", CIFAR_BATCH_BYTES)
        if not isinstance(entry, dict):
            raise UserError(f"{title} file {shown(path)} holds no batch")
        return entry

    splits = []
    for listed in (train_list, test_list):
        entries = [read(f, md5) for f, md5 in listed]
        images = np.vstack([e["data"] for e in entries]).reshape(-1, 3, 32, 32)
        labels = [y for e in entries for y in e.get("labels", e.get("fine_labels", []))]
        splits.append((torch.from_numpy(images).contiguous(), torch.as_tensor(labels).long()))
    classes = list(read(meta["filename"], meta["md5"])[meta["key"]])
    return splits[0], splits[1], classes
