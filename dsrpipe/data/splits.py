"""A split held in memory as uint8 NCHW images + int64 labels, batched, augmented and normalised
as whole tensors on the training device (and its streamed variant for sets too big for memory).

Every random choice (order, crop offsets, flips) comes from a private torch.Generator seeded
from (seed, epoch), never the global RNG, so a run is bit-for-bit reproducible and resuming at
epoch e replays epoch e's batches exactly. The random numbers are drawn on the CPU, so CPU and
GPU runs see the same batches too.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ..contract import check_class_names


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
        files = type(self.folder)([self.folder.files[i] for i in indices.tolist()])  # folders._ImageFiles
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


def at_most(split: Dataset, count: int | None) -> Dataset:
    if count is None or count >= len(split):
        return split
    # A fixed generator, so that every method and seed of a comparison sees the same images.
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:count]
    return split.subset(chosen.sort().values)


def in_memory_splits(name, classes, train_x, train_y, test_x, test_y, *, max_value=255, stats=None):

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
