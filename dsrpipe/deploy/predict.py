"""`dsrpipe predict`: classify images with an exported model, the way a deployer would: with
onnxruntime, numpy and Pillow only (no torch, no dsrpipe training code), so it also proves that
the file carries everything it needs (its class names and input size are in the file).

Images are read as training read image folders (dsrpipe.data): grey or RGB by the model's input
channels, the short side scaled to the input size and the long one centre-cropped (bilinear),
pixels / 255 in [0, 1]; the graph normalises them itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
BATCH = 64


def load_classifier(path: str | Path):
    """(session, class names, (channels, height, width)) of an exported model, or UserError."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a loadable ONNX model ({reason})") from None
    meta = session.get_modelmeta().custom_metadata_map
    try:
        names = json.loads(meta["class_names"])
    except KeyError:
        raise UserError(
            f"{path}: no class_names in the model's metadata (not exported by dsrpipe?)"
        ) from None
    except ValueError:
        raise UserError(f"{path}: the model's class_names metadata is not JSON") from None
    shape = session.get_inputs()[0].shape
    if (
        not isinstance(names, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and d > 0 for d in shape[1:])
        or shape[1] not in (1, 3)
    ):
        raise UserError(
            f"{path}: expected a classifier of [N, 1 or 3, H, W] images with a class_names list, "
            f"got input {shape}"
        )
    return session, [str(n) for n in names], tuple(shape[1:])


def read_image(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    """One image as float32 [channels, height, width] in [0, 1], or UserError."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except Exception as err:  # PIL raises many types for truncated or foreign files
        raise UserError(f"cannot read image {path}: {err}") from None
    if img.size != (width, height):  # scale the short side, centre-crop the long one
        img = ImageOps.fit(img, (width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32) / 255
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def image_paths(inputs: list[Path]) -> list[Path]:
    """The images named, a folder standing for the image files in it (sorted, not recursive)."""
    paths = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {item}")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"image not found: {item}")
    return paths


def predict(
    model: str | Path, inputs: list[Path], top_k: int = 1
) -> list[tuple[Path, list[tuple[str, float]]]]:
    """For each image, its `top_k` (class name, probability) pairs, most likely first."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    session, names, (channels, height, width) = load_classifier(model)
    paths = image_paths(inputs)
    input_name = session.get_inputs()[0].name
    results = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start : start + BATCH]
        pixels = np.stack([read_image(p, channels, height, width) for p in chunk])
        logits = session.run(None, {input_name: pixels})[0].astype(np.float64)
        if logits.ndim != 2 or logits.shape[1] != len(names):
            raise UserError(f"{model}: {logits.shape[-1]} outputs for {len(names)} class names")
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        for path, p in zip(chunk, probabilities):
            best = np.argsort(-p, kind="stable")[:top_k]
            results.append((path, [(names[i], float(p[i])) for i in best]))
    return results


def format_predictions(results) -> str:
    """One line per image: `path<TAB>class (probability), ...`."""
    return "\n".join(f"{path}\t" + ", ".join(f"{name} ({p:.3f})" for name, p in top) for path, top in results)
