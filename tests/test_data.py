"""The data layer: datasets, reproducible batches, augmentation, image folders, safe archives."""

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dsrpipe import data
from dsrpipe.data import (
    KNOWN_DATASETS,
    ArchiveCaps,
    Dataset,
    StreamingDataset,
    dataset_needs_root,
    folders,
    load_data,
    splits,
)
from dsrpipe.errors import UserError

from .helpers import image_tree, png, write_tree

REPO = Path(__file__).resolve().parents[1]
SHARED = next(
    (p for p in (Path("/work/shared/datasets"), REPO.parent / "shared" / "datasets") if p.is_dir()), None
)
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="real datasets absent: neither /work/shared/datasets nor ../shared/datasets"
)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def all_batches(split, **kwargs):
    batch_size = kwargs.pop("batch_size", 256)
    options = dict(shuffle=False, augment=False, seed=0, epoch=0) | kwargs
    xs, ys = zip(*split.batches(batch_size, **options))
    return torch.cat(xs), torch.cat(ys)


# --- in-memory datasets ------------------------------------------------------------------------


def test_digits_shapes_labels_and_values(digits):
    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    info = train.info
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("digits", 10, 1, 8)
    assert info.class_names == [str(i) for i in range(10)] and test.info == info
    x, y = all_batches(train, normalize=False)
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert torch.equal(x * 16, (x * 16).round())  # the raw values 0..16, scaled by exactly 1/16
    assert sorted(y.unique().tolist()) == list(range(10))
    # Stratified: every class is ~20% in test.
    assert torch.bincount(all_batches(test)[1]).min() >= 35


def test_batches_cover_every_sample_once(digits):
    train, _ = digits
    assert train.num_batches(100) == 15 and train.num_batches(100, drop_last=True) == 14
    batches = list(train.batches(100, shuffle=True, augment=False, seed=3, epoch=1))
    assert [len(y) for _, y in batches] == [100] * 14 + [37]
    assert len(list(train.batches(100, shuffle=True, augment=False, seed=3, epoch=1, drop_last=True))) == 14
    shuffled = torch.cat([x for x, _ in batches])
    in_order = all_batches(train)[0]
    assert not torch.equal(shuffled, in_order)
    assert torch.equal(shuffled.flatten(1).sum(1).sort().values, in_order.flatten(1).sum(1).sort().values)


def test_batches_reproducible_from_seed_and_epoch_only(digits):
    train, _ = digits
    global_rng = torch.get_rng_state()
    run = lambda seed, epoch: all_batches(train, shuffle=True, augment=True, seed=seed, epoch=epoch)
    x0, y0 = run(0, 5)
    torch.manual_seed(1234)  # the global RNG must not matter
    x1, y1 = run(0, 5)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(y0, run(0, 6)[1]) and not torch.equal(y0, run(1, 5)[1])
    torch.set_rng_state(global_rng)
    all_batches(train, shuffle=True, augment=True)
    assert torch.equal(torch.get_rng_state(), global_rng)  # nor be consumed


def test_normalisation_gives_zero_mean_unit_std(digits):
    train, _ = digits
    x, _ = all_batches(train)
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    raw, _ = all_batches(train, normalize=False)
    assert torch.allclose(x, (raw - train.info.mean[0]) / train.info.std[0])


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image moved by (dy, dx) pixels with zeros filling in: the reference for random_crop."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_grey_augmentation_shifts_without_flips(digits):
    train, _ = digits
    x, _ = all_batches(train, batch_size=64, normalize=False)
    xa, _ = all_batches(train, batch_size=64, normalize=False, augment=True)
    assert xa.shape == x.shape and torch.equal(xa, all_batches(train, normalize=False, augment=True)[0])
    assert (xa != x).flatten(1).any(1).float().mean() > 0.5
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for original, augmented in zip(x[:50], xa[:50]):
        assert any(torch.equal(augmented, shifted(original, dy, dx)) for dy, dx in shifts)


def test_colour_random_crop_is_a_reflect_padded_crop_or_its_mirror():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    offsets, mirrored = splits.crop_choices(64, 4, True, torch.Generator().manual_seed(0))
    out = splits.random_crop(images, offsets, mirrored, 4, reflect=True)
    assert out.shape == images.shape and 10 < int(mirrored.sum()) < 54
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)  # the reference padding
    for image, crop, (dy, dx), flip in zip(padded, out, offsets.tolist(), mirrored.tolist()):
        expected = image[:, dy : dy + 32, dx : dx + 32]
        assert torch.equal(crop, expected.flip(2) if flip else expected)


def test_colour_batches_use_reflect_padding():
    # A white image whose border row and column are black: zero padding would add black pixels
    # where reflect padding repeats the white ones next to the border.
    images = torch.full((40, 3, 8, 8), 255, dtype=torch.uint8)
    images[:, :, 0, :] = 0
    images[:, :, :, 0] = 0
    info = data.DatasetInfo("toy", 2, 3, 8, (0.5,) * 3, (0.5,) * 3, ["a", "b"])
    split = data.Dataset(info, images, torch.zeros(40, dtype=torch.long))
    x, _ = next(split.batches(40, shuffle=False, augment=True, seed=0, epoch=0, normalize=False))
    black_per_image = (x == 0).all(1).flatten(1).sum(1)
    assert int(black_per_image.max()) <= 8 + 8 - 1  # never more black than one row and one column


def test_resize_to_image_size():
    train, _ = load_data("digits", image_size=16)
    x, _ = next(train.batches(8, shuffle=False, augment=True, seed=0, epoch=0))
    assert train.info.image_size == 16 and x.shape == (8, 1, 16, 16)


def test_unknown_dataset_and_roots():
    with pytest.raises(UserError, match="unknown dataset 'imagenet'.*digits.*cifar10"):
        load_data("imagenet")
    assert not dataset_needs_root("digits")
    assert all(dataset_needs_root(name) for name in KNOWN_DATASETS if name != "digits")
    with pytest.raises(UserError, match="unknown dataset"):
        dataset_needs_root("svhn")


def test_missing_torchvision_files(tmp_path):
    with pytest.raises(UserError, match=f"dataset 'mnist': no MNIST files under {tmp_path}"):
        load_data("mnist", root=str(tmp_path))
    with pytest.raises(UserError, match="'cifar10'.*data.root"):
        load_data("cifar10")


@needs_shared
def test_mnist10k_from_shared_folder():
    train, test = load_data("mnist", root=str(SHARED / "mnist10k"))
    assert (len(train), len(test)) == (8000, 2000)
    info = train.info
    assert (info.in_channels, info.image_size, info.num_classes) == (1, 28, 10)
    assert abs(info.mean[0] - 0.1307) < 0.01 and abs(info.std[0] - 0.3081) < 0.01
    x, y = next(test.batches(500, shuffle=True, augment=True, seed=0, epoch=0, normalize=False))
    assert x.shape == (500, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and y.max() == 9


# --- image folders -------------------------------------------------------------------------------


def write_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return path


def load_folder(root, tmp_path, **kwargs):
    return load_data("imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


def test_imagefolder_from_directory(tmp_path):
    root = write_tree(tmp_path / "pets", image_tree())
    train, test = load_folder(root, tmp_path, num_workers=1)
    info = train.info
    assert (len(train), len(test)) == (12, 6)
    assert info.class_names == ["cat", "dog", "frog"] and (info.in_channels, info.image_size) == (3, 12)
    x, y = all_batches(train, normalize=False)
    expected = torch.from_numpy(np.array(Image.open(root / "train/dog/0.png"))).permute(2, 0, 1)
    assert torch.equal((x[4] * 255).round().to(torch.uint8), expected)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    x, _ = next(train.batches(5, shuffle=True, augment=True, seed=0, epoch=0))
    assert x.shape == (5, 3, 12, 12)


def test_parallel_decoding_matches_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "DECODE_CHUNK", 4)  # several chunks: the worker pool runs
    root = write_tree(tmp_path / "pets", image_tree())
    paths = sorted(root.rglob("*.png"))
    assert torch.equal(folders._decode_images(paths, 12, 2), folders._decode_images(paths, 12, 1))
    (root / "test/dog/1.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UserError, match="cannot decode .*test/dog/1.png"):  # raised in a worker
        folders._decode_images(sorted(root.rglob("*.png")), 12, 2)


def test_imagefolder_grey_mixed_sizes_and_val_split(tmp_path):
    tree = image_tree(mode="L", per_split={"train": 2, "val": 1})
    tree["train/cat/big.png"] = png(size=(30, 20), mode="L")  # other size: scaled + centre-cropped
    root = write_tree(tmp_path / "grey", tree)
    train, test = load_folder(root, tmp_path, image_size=10)
    assert (train.info.in_channels, train.info.image_size, len(train), len(test)) == (1, 10, 7, 3)
    assert next(test.batches(8, shuffle=False, augment=False, seed=0, epoch=0))[0].shape == (3, 1, 10, 10)


def test_imagefolder_second_load_uses_cache(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "pets", image_tree())
    first, _ = load_folder(root, tmp_path)
    (cache_file,) = (tmp_path / "cache" / "decoded").iterdir()
    mtime = cache_file.stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(folders, "_decode_images", no_decoding)
    second, _ = load_folder(root, tmp_path)
    assert torch.equal(first.images, second.images) and cache_file.stat().st_mtime_ns == mtime
    (root / "train/cat/0.png").write_bytes(png(seed=99))  # a changed file invalidates the cache
    with pytest.raises(AssertionError, match="decoded again"):
        load_folder(root, tmp_path)


@pytest.fixture(scope="session")
def cifar_jpegs():
    """{member name: bytes} of 4 real CIFAR-10 JPEGs from each of 3 classes of the shared archive."""
    if SHARED is None:
        pytest.skip("real datasets absent: neither /work/shared/datasets nor ../shared/datasets")
    picked = {}
    with tarfile.open(SHARED / "cifar10-jpg.tar.gz") as tar:
        for member in tar:  # the test split comes first; stop after 3 classes
            parts = member.name.split("/")
            if member.isfile() and parts[1] == "test" and int(parts[3].split(".")[0]) < 4:
                if len({p.split("/")[2] for p in picked} | {parts[2]}) > 3:
                    break
                picked[member.name] = tar.extractfile(member).read()
    return picked


def test_imagefolder_from_targz_with_top_folder(cifar_jpegs, tmp_path):
    # Like the real archive: cifar10/{train,test}/<class>/*.jpg
    members = [
        (name.replace("/test/", f"/{split}/"), content)
        for split in ("train", "test")
        for name, content in cifar_jpegs.items()
    ]
    archive = write_tar(tmp_path / "cifar-mini.tar.gz", members)
    train, test = load_folder(archive, tmp_path)
    assert (len(train), len(test)) == (12, 12)
    assert train.info.class_names == ["airplane", "automobile", "bird"]
    assert (train.info.in_channels, train.info.image_size) == (3, 32)
    x, _ = next(train.batches(12, shuffle=True, augment=True, seed=0, epoch=0))
    assert x.shape == (12, 3, 32, 32)
    (extracted,) = [p for p in (tmp_path / "cache" / "archives").iterdir()]
    assert extracted.name.startswith("cifar-mini-")  # unpacked once, in place, nothing left over


def test_imagefolder_from_zip(tmp_path):
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, content in image_tree(top="pets/").items():
            zf.writestr(name, content)
    train, test = load_folder(archive, tmp_path)
    assert (len(train), len(test), train.info.num_classes) == (12, 6, 3)


def test_streaming_fallback_for_big_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "MAX_IN_MEMORY_BYTES", 0)
    root = write_tree(tmp_path / "pets", image_tree())
    train, test = load_folder(root, tmp_path, image_size=8, num_workers=1)
    assert isinstance(train, StreamingDataset) and isinstance(train, Dataset) and len(test) == 6
    run = lambda: all_batches(train, batch_size=5, shuffle=True, augment=True, seed=0, epoch=2)
    x, y = run()
    assert x.shape == (12, 3, 8, 8) and sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(x, run()[0]) and train.num_batches(5) == 3


def test_subsets_are_fixed_whatever_the_run(digits, tmp_path, monkeypatch):
    train, test = load_data("digits", max_train=300, max_test=100)
    again, _ = load_data("digits", max_train=300)
    assert (len(train), len(test)) == (300, 100) and torch.equal(train.images, again.images)
    full_images = [bytes(x.numpy()) for x in digits[0].images]
    assert all(bytes(x.numpy()) in full_images for x in train.images)  # real images, kept whole
    assert len(set(train.labels.tolist())) == 10  # random, not the first 300 in file order
    assert load_data("digits", max_train=10**6)[0].images.shape == digits[0].images.shape
    monkeypatch.setattr(folders, "MAX_IN_MEMORY_BYTES", 0)  # the streaming path subsets its file list
    streamed, _ = load_folder(
        write_tree(tmp_path / "pets", image_tree()), tmp_path, image_size=8, num_workers=1, max_train=5
    )
    assert isinstance(streamed, StreamingDataset) and len(streamed) == 5


# --- rejected inputs -----------------------------------------------------------------------------


def tar_member(name, kind=tarfile.REGTYPE, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "member, why",
    [
        (("../evil.png", b"x"), "outside the archive"),
        (("data/../../evil.png", b"x"), "outside the archive"),
        (("/tmp/evil.png", b"x"), "outside the archive"),
        (tar_member("data/train/link", tarfile.SYMTYPE, "/etc/passwd"), "link or special file"),
        (tar_member("data/train/hard", tarfile.LNKTYPE, "/etc/passwd"), "link or special file"),
        (tar_member("data/train/null", tarfile.CHRTYPE), "link or special file"),
    ],
)
def test_unsafe_tar_members_rejected(tmp_path, member, why):
    archive = write_tar(tmp_path / "bad.tar.gz", [("data/train/a/0.png", png()), member])
    name = member[0] if isinstance(member, tuple) else member.name
    with pytest.raises(UserError, match=f"{archive}.*'{name}'.*{why}"):
        load_folder(archive, tmp_path)
    leftovers = list((tmp_path / "cache" / "archives").iterdir())
    assert leftovers == []  # an aborted extraction leaves nothing that looks unpacked
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()


def test_unsafe_zip_members_rejected(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(UserError, match="'../evil.png'.*outside"):
        data.extract_archive(archive, tmp_path / "out")
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("train/a/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UserError, match="'train/a/link.png'.*link"):
        data.extract_archive(archive, tmp_path / "out")


def test_archive_bombs_rejected(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/a/zeros.png", bytes(10 * 2**20))  # 10 MiB of zeros, ~10 KiB packed
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UserError, match="bomb.zip.*'train/a/zeros.png'.*more than 1048576 bytes"):
        load_folder(bomb, tmp_path, archive_caps=ArchiveCaps(max_bytes=2**20))
    many = write_tar(tmp_path / "many.tar.gz", [(f"train/a/{i}.png", b"") for i in range(20)])
    with pytest.raises(UserError, match="'train/a/10.png'.*more than 10 members"):
        data.extract_archive(many, tmp_path / "out", ArchiveCaps(max_files=10))


def test_bad_folders_rejected(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_folder(tmp_path / "nowhere", tmp_path)
    with pytest.raises(UserError, match="set data.root"):
        load_data("imagefolder")
    with pytest.raises(UserError, match="no train/ and test/"):
        load_folder(write_tree(tmp_path / "flat", {"a/0.png": png()}), tmp_path)

    corrupt = write_tree(tmp_path / "corrupt", image_tree() | {"train/dog/9.png": b"not a png"})
    with pytest.raises(UserError, match="cannot decode .*train/dog/9.png"):
        load_folder(corrupt, tmp_path, num_workers=1)

    empty = write_tree(tmp_path / "empty", image_tree())
    (empty / "test/dog").mkdir(exist_ok=True)
    for image in (empty / "test/dog").iterdir():
        image.unlink()
    with pytest.raises(UserError, match="class folder .*test/dog holds no images"):
        load_folder(empty, tmp_path)

    mismatch = write_tree(tmp_path / "mismatch", image_tree() | {"test/bird/0.png": png()})
    with pytest.raises(UserError, match="classes"):
        load_folder(mismatch, tmp_path)


def write_cifar_batches(folder, hostile=False):
    """CIFAR's python layout: pickled dicts of a uint8 (N, 3072) array and labels, and a meta file."""
    import hashlib
    import pickle

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {
        "data_batch_1": {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": [0, 1] * 3},
        "test_batch": {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 0] * 2},
        "batches.meta": {"label_names": ["cat", "dog"]},
    }

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'ran'}",))

    if hostile:
        batches["data_batch_1"] = {"data": Planted(), "labels": []}
    md5 = {}
    for name, content in batches.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return (
        [("data_batch_1", md5["data_batch_1"])],
        [("test_batch", md5["test_batch"])],
        {
            "filename": "batches.meta",
            "key": "label_names",
            "md5": md5["batches.meta"],
        },
    )


def test_cifar_batches_are_read_without_running_what_a_pickle_names(tmp_path):
    """torchvision's CIFAR reader calls pickle.load on files under data.root; ours builds plain data
    and numpy arrays only. A batch whose pickle names os.system (its md5 listed, so only the
    unpickler stands in the way) is one line, and nothing runs."""
    from dsrpipe.data.sources import _read_cifar_batches

    train, test, meta = write_cifar_batches(tmp_path / "good")
    (train_x, train_y), (test_x, test_y), classes = _read_cifar_batches(
        tmp_path / "good", train, test, meta, "CIFAR-10"
    )
    assert train_x.shape == (6, 3, 32, 32) and train_x.dtype == torch.uint8 and test_x.shape == (4, 3, 32, 32)
    assert train_y.tolist() == [0, 1] * 3 and test_y.tolist() == [1, 0] * 2 and classes == ["cat", "dog"]

    train, test, meta = write_cifar_batches(tmp_path / "bad", hostile=True)
    with pytest.raises(
        UserError, match=r"CIFAR-10 file .*data_batch_1 cannot be read \(it holds Python objects.*system"
    ):
        _read_cifar_batches(tmp_path / "bad", train, test, meta, "CIFAR-10")
    assert not (tmp_path / "bad" / "ran").exists()
    with pytest.raises(UserError, match="no CIFAR-10 files under"):  # a changed file fails its md5 first
        _read_cifar_batches(tmp_path / "good", [("data_batch_1", "0" * 32)], test, meta, "CIFAR-10")


def test_unset_image_size_is_the_median_side_within_bounds(tmp_path):
    """Not the first image's side: the median short side of a sample, kept within AUTO_SIDES."""

    def listing(*sides):
        paths = []
        for i, (w, h) in enumerate(sides):
            (tmp_path / f"{i}.png").write_bytes(png((w, h)))
            paths.append((tmp_path / f"{i}.png", 0))
        return paths

    assert folders.median_side(listing((50, 60), (10, 10), (40, 30), (20, 90), (33, 33))) == 30
    low, high = folders.AUTO_SIDES
    assert folders.median_side(listing((2, 2), (3, 5), (4, 4))) == low
    assert folders.median_side(listing((high * 2, high * 3))) == high


def test_the_median_side_is_taken_over_every_class(tmp_path):
    """150 training images, 60 of 10x10 in the first class and 90 of 40x40 in the second: the
    sample spreads over both, so the side is the second class's, the median of the set. The first
    99 files (what a stride of 150 // 99 = 1 took) make it the first class's."""
    for cls, (count, side) in {"a": (60, 10), "b": (90, 40)}.items():
        (tmp_path / cls).mkdir()
        for i in range(count):
            (tmp_path / cls / f"{i:03d}.png").write_bytes(png((side, side), "L"))
    files = folders._list_images(tmp_path, ["a", "b"])
    assert len(files) == 150 and folders.median_side(files) == 40
