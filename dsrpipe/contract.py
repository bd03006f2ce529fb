"""What a model file promises whoever deploys it, shared by training (config, data, export) and by
`predict`, which must run without training code: the largest input side, the class-name rules,
the image files read, and how an image is fitted to the model's input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

MAX_IMAGE_SIZE = 1024  # the largest image side dsrpipe trains, and that a model may declare
MAX_CLASS_NAME = 256
# The image files an image-folder dataset is listed from and `predict` reads from a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL's one-channel modes


def check_class_names(names, where: str, count: int | None = None) -> list[str]:
    """`names` if it is a list of `count` class names, each printable text without line breaks,
    1 to MAX_CLASS_NAME characters (predict writes one line per image, names included), else a
    one-line UserError that starts with `where` and quotes none of them. The one check for
    both ends: export, before anything is written, and predict, of the file it is given."""
    rule = f"printable text without line breaks, 1 to {MAX_CLASS_NAME} characters each"
    if not isinstance(names, list):
        raise UserError(
            f"{where}: class_names must be a list of names ({rule}), not a {type(names).__name__}"
        )
    for i, name in enumerate(names):
        if not (isinstance(name, str) and name.isprintable() and 0 < len(name) <= MAX_CLASS_NAME):
            raise UserError(
                f"{where}: class_names must be a list of names ({rule}); name {i} (counting from 0) is not"
            )
    if count is not None and len(names) != count:
        raise UserError(f"{where}: {len(names)} class_names for a model of {count} classes")
    return names


def decode_fitted(path: str | Path, width: int, height: int, *, grey: bool | None, failed: str) -> np.ndarray:
    """An image as uint8 (height, width) grey or (height, width, 3) RGB: its short side scaled to
    fit, its long side centre-cropped, as training decoded its images and as `predict` feeds the
    model. `grey`: one channel (True), RGB (False), or as the file is (None: grey files stay grey).
    A file PIL cannot decode is a UserError `<failed> <path>: <why>`."""
    try:
        with Image.open(path) as img:
            keep_grey = img.mode in _GREY_MODES if grey is None else grey
            img = img.convert("L" if keep_grey else "RGB")
    except (MemoryError, OverflowError):  # not the file's fault: the caller says it for the batch
        raise
    except Exception as exc:  # PIL raises many types for truncated or foreign files
        raise UserError(f"{failed} {path}: {exc}") from None
    if img.size != (width, height):
        img = ImageOps.fit(img, (width, height), Image.Resampling.BILINEAR)
    return np.asarray(img)
