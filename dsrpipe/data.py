"""Datasets: a split is held in memory as uint8 NCHW images + int64 labels, and batches are
shuffled, augmented and normalised as whole tensors on the training device.

Every random choice (order, crop offsets, flips) comes from a private torch.Generator seeded
from (seed, epoch), never the global RNG, so a run is bit-for-bit reproducible and resuming at
epoch e replays epoch e's batches exactly. The random numbers are drawn on the CPU, so CPU and
GPU runs see the same batches too.

Image folders (a directory or a .tar.gz/.tgz/.tar/.zip archive of train/ and test/ class
folders) are unpacked safely and decoded once into a cache; sets too big for memory (ImageNet)
are streamed from disk by DataLoader workers instead.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import shutil
import signal
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from .contract import check_class_names
from .errors import UserError
from .files import is_text, load_arrays_pickle, shown, torch_save
from .imagefolder import ARCHIVE_SUFFIXES, archive_suffix, find_splits, visible_dirs

KNOWN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_CACHE_DIR = "~/.cache/dsrpipe"

# Limits on what an archive may unpack to: anything beyond is rejected as a likely archive bomb.
MAX_ARCHIVE_BYTES = 20 * 2**30
MAX_ARCHIVE_FILES = 2_000_000
# A decoded image folder bigger than this is streamed from disk rather than held in memory.
MAX_IN_MEMORY_BYTES = 4 * 2**30
DECODE_CHUNK = 512  # images per task sent to a decoding worker process
CACHE_VERSION = 1  # bump when the decoded-cache layout or decoding changes

# torchvision class name, name in messages
_TORCHVISION_SETS = {
    "mnist": ("MNIST", "MNIST"),
    "fashion-mnist": ("FashionMNIST", "Fashion-MNIST"),
    "cifar10": ("CIFAR10", "CIFAR-10"),
    "cifar100": ("CIFAR100", "CIFAR-100"),
}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# ImageNet statistics: the streamed path cannot afford a pass over the data to measure its own.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int  # square side in pixels
    mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
    std: tuple[float, ...]
    class_names: list[str]


class Dataset:
    """One split in memory: uint8 images (N, C, H, W) whose pixel values run 0..max_value."""

    def __init__(
        self, info: DatasetInfo, images: torch.Tensor, labels: torch.Tensor, *, max_value: int = 255
    ):
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.info, self.images, self.labels, self.max_value = info, images, labels.long(), max_value
        self._copies = {torch.device("cpu"): (self.images, self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int,
        epoch: int,
        device: torch.device | str = "cpu",
        normalize: bool = True,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `batch_size`, or with `shard` = (rank, world size) this rank's part of each:
        rows rank·b to (rank+1)·b of every batch, b = batch_size / world size. Every random
        choice is drawn for the whole batch first, so the ranks' parts together are exactly the
        one-process batch, augmentation included."""
        device = torch.device(device)
        rank, world = shard
        if world > 1 and not drop_last:
            raise ValueError("sharded batches drop the last partial batch")
        part = batch_size // world
        generator = _generator(seed, epoch)
        images, labels = self._on(device)
        count = self.num_batches(batch_size, drop_last)
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        order = order[: count * batch_size]
        pad, flip = augmentation_for(self.info)
        # The epoch's random choices are drawn up front, batch by batch as before, and sent to the
        # device in one copy: a copy per step would make the host wait for the GPU every step.
        crops = (
            [
                crop_choices(min(batch_size, len(order) - i * batch_size), pad, flip, generator)
                for i in range(count)
            ]
            if augment
            else []
        )
        plan = [order] + ([torch.cat(c) for c in zip(*crops)] if crops else [])
        plan = [t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t for t in plan]
        for i in range(count):
            batch = slice(i * batch_size + rank * part, i * batch_size + (rank + 1) * part)
            index = plan[0][batch]
            x = images[index]
            if augment:
                x = random_crop(x, plan[1][batch], plan[2][batch], pad, reflect=self.info.in_channels == 3)
            yield _to_float(x, self.max_value, self.info, normalize), labels[index]

    def subset(self, indices: torch.Tensor) -> Dataset:
        return Dataset(self.info, self.images[indices], self.labels[indices], max_value=self.max_value)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # The whole uint8 split goes to the device once (≤ 4 GiB by construction), so a batch
        # is an index on the device rather than a host-to-device copy every step.
        if device not in self._copies:
            self._copies[device] = (self.images.to(device), self.labels.to(device))
        return self._copies[device]


class StreamingDataset(Dataset):
    """A split too big for memory: decoded from disk by DataLoader workers, ImageNet-style."""

    def __init__(self, info: DatasetInfo, folder, num_workers: int):
        self.info, self.folder, self.max_value = info, folder, 255
        # Workers are required: they seed their own RNG from the loader's generator, which keeps
        # the transforms' randomness reproducible and off the main process's global RNG.
        self.num_workers = max(1, num_workers)

    def __len__(self) -> int:
        return len(self.folder)

    def subset(self, indices: torch.Tensor) -> StreamingDataset:
        files = _ImageFiles([self.folder.files[i] for i in indices.tolist()])
        return StreamingDataset(self.info, files, self.num_workers)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int,
        epoch: int,
        device: torch.device | str = "cpu",
        normalize: bool = True,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader
        from torchvision import transforms as T

        device = torch.device(device)
        size = self.info.image_size
        resize = (
            (T.RandomResizedCrop(size), T.RandomHorizontalFlip())
            if augment
            else (T.Resize(round(size * 256 / 224)), T.CenterCrop(size))
        )
        self.folder.transform = T.Compose([*resize, T.PILToTensor()])  # uint8: 4x less IPC
        rank, world = shard
        if world > 1:  # this rank's rows of each batch of one (seed, epoch) order, as in memory
            if not drop_last:
                raise ValueError("sharded batches drop the last partial batch")
            generator = _generator(seed, epoch)
            order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
            count, part = len(self) // batch_size, batch_size // world
            mine = order[: count * batch_size].view(count, world, part)[:, rank].reshape(-1)
            loader = DataLoader(
                self.folder,
                part,
                sampler=mine.tolist(),
                num_workers=self.num_workers,
                generator=generator,
                pin_memory=device.type == "cuda",
            )
        else:
            loader = DataLoader(
                self.folder,
                batch_size,
                shuffle=shuffle,
                drop_last=drop_last,
                num_workers=self.num_workers,
                generator=_generator(seed, epoch),
                pin_memory=device.type == "cuda",
            )
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            yield _to_float(x, 255, self.info, normalize), y.to(device, non_blocking=True)


def augmentation_for(info: DatasetInfo) -> tuple[int, bool]:
    """(max shift in pixels, mirror?): the standard pad-4 crop + flip for colour images (scaled
    with size), a small shift without flips for grey digits, whose mirror images are not digits."""
    if info.in_channels == 3:
        return max(1, info.image_size // 8), True
    return max(1, info.image_size // 14), False


def crop_choices(
    n: int, pad: int, flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (row, column) offsets in [0, 2·pad] and mirror flags for `n` images."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    mirrored = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return offsets, mirrored


def random_crop(
    images: torch.Tensor, offsets: torch.Tensor, mirrored: torch.Tensor, pad: int, *, reflect: bool = False
) -> torch.Tensor:
    """Pad each image by `pad` (zeros, or the mirror image of its border as in the DSR authors'
    CIFAR pipeline), crop it back at `offsets` and mirror where `mirrored`: one gather for the
    whole batch, reading the unpadded image, with no Python loop over samples."""
    n, c, h, w = images.shape
    device = images.device
    rows = offsets[:, :1].to(device) - pad + torch.arange(h, device=device)  # (n, h), may fall outside
    cols = offsets[:, 1:].to(device) - pad + torch.arange(w, device=device)  # (n, w)
    cols = torch.where(mirrored.to(device)[:, None], cols.flip(1), cols)
    if reflect:  # -1 -> 1, h -> h - 2
        rows = (h - 1) - ((h - 1) - rows.abs()).abs()
        cols = (w - 1) - ((w - 1) - cols.abs()).abs()
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    # A flat pixel index per output pixel, shared by the channels: gather beats 4-D indexing 5x.
    index = (rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]).view(n, 1, h * w)
    out = images.flatten(2).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
    return out if reflect else out * inside[:, None].to(out.dtype)


def _to_float(x: torch.Tensor, max_value: int, info: DatasetInfo, normalize: bool) -> torch.Tensor:
    x = x.float().div_(max_value)
    if normalize:
        mean, std = _statistics_on(x.device, info.mean, info.std)
        x = x.sub_(mean).div_(std)
    return x


@functools.lru_cache(maxsize=64)
def _statistics_on(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]):
    # Made once per device: a host-to-device copy every batch would make the host wait for the GPU.
    return (
        torch.tensor(mean, device=device).view(1, -1, 1, 1),
        torch.tensor(std, device=device).view(1, -1, 1, 1),
    )


def _generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch) so neighbouring pairs get unrelated streams.
    high, low = np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(high) << 32 | int(low))


# ---------------------------------------------------------------------------------------------
# Loading


def dataset_needs_root(name: str) -> bool:
    """Whether `name` reads files (and so needs data.root); raises UserError for unknown names."""
    return _check_name(name) != "digits"


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
) -> tuple[Dataset, Dataset]:
    """Load (train, test) splits of `dataset`; see KNOWN_DATASETS. `max_train`/`max_test` keep
    a random subset of that many images of a split, the same one whatever the run's seed."""
    train, test = _load_splits(dataset, root, download, image_size, cache_dir, num_workers)
    return _at_most(train, max_train), _at_most(test, max_test)


def _at_most(split: Dataset, count: int | None) -> Dataset:
    if count is None or count >= len(split):
        return split
    # A fixed generator, so that every method and seed of a comparison sees the same images.
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:count]
    return split.subset(chosen.sort().values)


def _load_splits(dataset, root, download, image_size, cache_dir, num_workers) -> tuple[Dataset, Dataset]:
    name = _check_name(dataset)
    if image_size is not None and image_size < 1:
        raise UserError(f"dataset '{name}': image_size must be a positive integer, got {image_size}")
    num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    if name == "imagefolder":
        cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
        return _load_imagefolder(root, image_size, cache, num_workers)
    if name == "digits":
        (train_x, train_y), (test_x, test_y) = _read_digits()
        classes, max_value = [str(i) for i in range(10)], 16
    else:
        (train_x, train_y), (test_x, test_y), classes = _read_torchvision(name, root, download)
        max_value = 255
    if image_size is not None and image_size != train_x.shape[-1]:
        train_x, test_x = _resize(train_x, image_size, max_value), _resize(test_x, image_size, max_value)
    return _splits(name, classes, train_x, train_y, test_x, test_y, max_value=max_value)


def _check_name(name: str) -> str:
    if name not in KNOWN_DATASETS:
        raise UserError(f"unknown dataset '{name}' (known: {', '.join(KNOWN_DATASETS)})")
    return name


def _splits(name, classes, train_x, train_y, test_x, test_y, *, max_value=255, stats=None):

    check_class_names(list(classes), f"dataset '{name}'")
    mean, std = stats or channel_stats(train_x, max_value)
    info = DatasetInfo(
        name=name,
        num_classes=len(classes),
        in_channels=train_x.shape[1],
        image_size=train_x.shape[-1],
        mean=mean,
        std=std,
        class_names=list(classes),
    )
    return (
        Dataset(info, train_x, train_y, max_value=max_value),
        Dataset(info, test_x, test_y, max_value=max_value),
    )


def channel_stats(images: torch.Tensor, max_value: int = 255) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of pixels scaled to [0, 1], exact and light on memory: computed
    from a 256-bin histogram of the uint8 values rather than a float copy of the data."""
    values = torch.arange(256, dtype=torch.float64) / max_value
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].flatten(), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean) ** 2).sum() / counts.sum()
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-3))  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)


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
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # values 0..16, kept as they are and scaled by 1/16 (max_value)
    x = torch.from_numpy(digits.images.astype(np.uint8))[:, None]
    y = torch.from_numpy(digits.target).long()
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return (train_x, train_y), (test_x, test_y)


def _read_torchvision(name: str, root: str | None, download: bool):
    import torchvision

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


def _read_cifar(cls, title: str, root: str, download: bool):
    """CIFAR-10/100 from torchvision's python batches, as torchvision lays them out and checks
    them (md5), but without its pickle.load: a file under data.root is the user's, so it is read
    with an unpickler that builds plain data and numpy arrays only (files.load_arrays_pickle)."""
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

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
    from torchvision.datasets.utils import check_integrity

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


# ---------------------------------------------------------------------------------------------
# Image folders


def _load_imagefolder(root, image_size, cache_dir: Path, num_workers: int):
    if root is None:
        raise UserError(
            "dataset 'imagefolder': set data.root to a folder or archive "
            "holding train/ and test/ class folders"
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"dataset 'imagefolder': {path} does not exist")
    if path.is_file():
        path = extract_archive(path, cache_dir / "archives")
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
    size = image_size or _first_image_side(train_files[0][0])

    if len(train_files) * 3 * size * size > MAX_IN_MEMORY_BYTES:
        info = DatasetInfo("imagefolder", len(classes), 3, size, _IMAGENET_MEAN, _IMAGENET_STD, classes)
        return (
            StreamingDataset(info, _ImageFiles(train_files), num_workers),
            StreamingDataset(info, _ImageFiles(test_files), num_workers),
        )

    files = train_files + test_files
    key = _fingerprint(
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
    return _splits("imagefolder", classes, train_x, train_y, test_x, test_y, stats=cached["stats"])


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


def _first_image_side(path: Path) -> int:
    from PIL import Image

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
    from PIL import Image, ImageOps

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if img.mode in _GREY_MODES else "RGB")
        except Exception as e:  # PIL raises many types for truncated or foreign files
            raise UserError(f"dataset 'imagefolder': cannot decode {path}: {e}") from None
        if img.size != (size, size):  # scale the short side to `size`, centre-crop the long one
            img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(img))
    return arrays


def _open_rgb(path: str):
    from PIL import Image

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


def _fingerprint(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Safe archive extraction


def extract_archive(
    archive: str | os.PathLike,
    dest_root: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    max_files: int | None = None,
) -> Path:
    """Unpack `archive` once into dest_root/<name>-<key> (key: path, size, mtime) and return it.

    Members must be plain files or folders with UTF-8 relative paths inside the archive; their
    total size and count are capped (MAX_ARCHIVE_BYTES, MAX_ARCHIVE_FILES), checked on the sizes
    the archive declares (zip: its central directory; tar: its headers) before anything is
    unpacked. It unpacks into a temporary folder renamed into place at the end, so an
    interrupted extraction never looks complete.
    """
    archive = Path(archive)
    suffix = archive_suffix(archive.name)
    if not suffix:
        raise UserError(f"{archive} is neither a folder nor a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    st = archive.stat()
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{archive} is not a regular file")
    stem = archive.name[: -len(suffix)]
    target = Path(dest_root) / f"{stem}-{_fingerprint(str(archive.resolve()), st.st_size, st.st_mtime_ns)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    limits = _Limits(
        archive,
        MAX_ARCHIVE_BYTES if max_bytes is None else max_bytes,
        MAX_ARCHIVE_FILES if max_files is None else max_files,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=target.parent))
    try:
        if suffix == ".zip":
            _extract_zip(archive, tmp, limits)
        else:
            _extract_tar(archive, tmp, limits)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished the same extraction first
                raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise UserError(f"cannot unpack archive {archive}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class _Limits:
    """Checks members one by one: a safe relative path, and running totals under the caps."""

    def __init__(self, archive: Path, max_bytes: int, max_files: int):
        self.archive, self.max_bytes, self.max_files = archive, max_bytes, max_files
        self.bytes = self.files = 0

    def check(self, name: str, size: int, safe_type: bool) -> None:
        path = PurePosixPath(name)
        if not is_text(name):
            self.reject(name, "a name that is not valid UTF-8")
        if path.is_absolute() or name.startswith("\\") or ".." in path.parts:
            self.reject(name, "a path outside the archive")
        if not safe_type:
            self.reject(name, "a link or special file, not a plain file or folder")
        self.files += 1
        self.bytes += size
        if self.files > self.max_files:
            self.reject(name, f"more than {self.max_files} members")
        if self.bytes > self.max_bytes:
            self.reject(name, f"more than {self.max_bytes} bytes unpacked")

    def reject(self, name: str, why: str):
        raise UserError(f"unsafe archive {shown(self.archive)}: member '{shown(name)}': {why}")


def _extract_tar(archive: Path, dest: Path, limits: _Limits) -> None:
    # First every header (tarfile skips over the data; a compressed archive is decompressed, not
    # written), so a bomb is refused before a byte is unpacked. A header's size is exact: the
    # data that follows is that long. The 'data' filter is a second guard.
    with tarfile.open(archive) as tar:
        members = []
        for member in tar:
            limits.check(member.name, member.size, member.isfile() or member.isdir())
            members.append(member)
        for member in members:
            tar.extract(member, dest, filter="data")


def _extract_zip(archive: Path, dest: Path, limits: _Limits) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()  # the central directory: every member's declared size
        for info in members:
            # Unix file type from the mode bits; 0 when the zip was written without one.
            kind = stat.S_IFMT(info.external_attr >> 16)
            plain = kind in (0, stat.S_IFREG, stat.S_IFDIR)
            # file_size bounds what is written: zipfile stops there and checks the CRC.
            limits.check(info.filename, info.file_size, plain)
        for info in members:
            zf.extract(info, dest)
