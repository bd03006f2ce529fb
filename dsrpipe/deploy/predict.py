"""`dsrpipe predict`: classify images with an exported model, the way a deployer would: with
onnxruntime, numpy and Pillow only (no torch, no dsrpipe training code), so it also proves that
the file carries everything it needs (its class names and input size are in the file).

Images are read as training read image folders (dsrpipe.data): grey or RGB by the model's input
channels, the short side scaled to the input size and the long one centre-cropped (bilinear),
pixels / 255 in [0, 1]; the graph normalises them itself.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np

from ..contract import IMAGE_SUFFIXES, MAX_IMAGE_SIZE, check_class_names, decode_fitted
from ..errors import UserError
from ..names import file_kind, shown

BATCH = 64


# The largest image side a model may declare: data.image_size's bound, the largest dsrpipe trains.
# Also the most that --max-side may allow: a batch of BATCH images of it is 0.8 GB of float32.
MAX_SIDE = MAX_IMAGE_SIZE


def open_session(path: str | Path, threads: int | None = None, *, spinning: bool = True):
    """An onnxruntime CPU session of the model file, or UserError (onnxruntime raises its own
    types: InvalidProtobuf, Fail, ...). `spinning=False`: the intra-op threads sleep between
    runs instead of spinning (for sessions timed side by side, see validate)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; we raise those ourselves
    if threads is not None:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise UserError(f"{path}: not a loadable ONNX model ({_first_line(err)})") from None


def run_session(session, pixels: np.ndarray, path: str | Path) -> np.ndarray:
    """The model's first output for a batch of images, or a one-line UserError where onnxruntime
    fails (declared shapes that its graph does not keep, an allocation beyond memory, ...)."""
    try:
        return session.run(None, {session.get_inputs()[0].name: pixels})[0]
    except Exception as err:
        shape = "x".join(map(str, pixels.shape))
        raise UserError(
            f"{path}: onnxruntime cannot run the model on a {shape} batch ({_first_line(err)})"
        ) from None


def input_shape(session, path: str | Path, max_side: int = MAX_SIDE) -> tuple[int, int, int]:
    """(channels, height, width) the model declares, checked before any image is made that size:
    1 or 3 channels, sides from 1 to `max_side`."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]) or shape[1] not in (1, 3):
        raise UserError(f"{path}: expected a classifier of [N, 1 or 3, H, W] images, got input {shape}")
    if max(shape[2:]) > max_side:
        raise UserError(
            f"{path}: the model declares {shape[2]}x{shape[3]} images, larger than the {max_side} "
            "pixels per side accepted (--max-side)"
        )
    return tuple(shape[1:])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def class_names(meta: dict, path: Path, count: int | None = None) -> list[str]:
    """The class_names metadata of the model file at `path` (see check_class_names), or UserError."""
    try:
        names = json.loads(meta["class_names"])
    except KeyError:
        raise UserError(
            f"{path}: no class_names in the model's metadata (not exported by dsrpipe?)"
        ) from None
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        raise UserError(f"{path}: the model's class_names metadata is not a JSON list") from None
    return check_class_names(names, str(path), count)


def load_classifier(path: str | Path, max_side: int = MAX_SIDE):
    """(session, class names, (channels, height, width)) of an exported model, or UserError."""
    path = Path(path)
    session = open_session(path)
    classes = session.get_outputs()[0].shape[-1] if session.get_outputs()[0].shape else None
    names = class_names(
        session.get_modelmeta().custom_metadata_map, path, classes if isinstance(classes, int) else None
    )
    return session, names, input_shape(session, path, max_side)


def read_image(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    """One image as float32 [channels, height, width] in [0, 1], or UserError."""
    image = decode_fitted(path, width, height, grey=channels == 1, failed="cannot read image")
    pixels = image.astype(np.float32) / 255
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def image_paths(inputs: list[Path]) -> list[Path]:
    """The images named, a folder standing for the image files in it (sorted, not recursive). A
    name that is neither a folder nor a regular file (a FIFO, which decoding would wait on for
    good; a device) is refused in one line that says what it is."""
    paths = []
    for item in inputs:
        try:
            mode = item.stat().st_mode  # through a link: a link to an image is an image
        except FileNotFoundError:
            raise UserError(f"image not found: {shown(item)}") from None
        except OSError as exc:
            raise UserError(f"cannot read image {shown(item)}: {exc.strerror}") from None
        if stat.S_ISDIR(mode):
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {shown(item)}")
            paths += found
        elif stat.S_ISREG(mode):
            paths.append(item)
        else:
            raise UserError(f"image {shown(item)} is {file_kind(mode)}, not a regular file")
    return paths


def predict(
    model: str | Path, inputs: list[Path], top_k: int = 1, max_side: int | None = None
) -> list[tuple[Path, list[tuple[str, float]]]]:
    """For each image, its `top_k` (class name, probability) pairs, most likely first. The model
    may declare image sides up to `max_side` (None: MAX_SIDE; at most MAX_SIDE). Both options
    are checked before the model is opened."""
    max_side = MAX_SIDE if max_side is None else max_side
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if not 1 <= max_side <= MAX_SIDE:
        raise UserError(
            f"--max-side must be from 1 to {MAX_SIDE} (the largest side a model may declare), got {max_side}"
        )
    session, names, (channels, height, width) = load_classifier(model, max_side)
    paths = image_paths(inputs)
    results = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start : start + BATCH]
        try:
            pixels = np.stack([read_image(p, channels, height, width) for p in chunk])
        except (MemoryError, OverflowError) as err:  # a machine short of memory for the model's size
            raise UserError(
                f"{model}: not enough memory for {len(chunk)} images of {channels}x{height}x{width} "
                f"({type(err).__name__}): a smaller --max-side refuses such a model at once"
            ) from None
        logits = run_session(session, pixels, model).astype(np.float64)
        if logits.ndim != 2 or logits.shape != (len(chunk), len(names)):
            raise UserError(
                f"{model}: outputs of shape {logits.shape} for {len(chunk)} images of {len(names)} classes"
            )
        probabilities = softmax(logits)
        for path, p in zip(chunk, probabilities):
            best = np.argsort(-p, kind="stable")[:top_k]
            results.append((path, [(names[i], float(p[i])) for i in best]))
    return results


def softmax(logits: np.ndarray) -> np.ndarray:
    """Each row's probabilities (float64 logits [images, classes]): every row sums to 1."""
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    return probabilities / probabilities.sum(1, keepdims=True)


def format_predictions(results) -> str:
    """One line per image: `path<TAB>class (probability), ...`."""
    return "\n".join(f"{path}\t" + ", ".join(f"{name} ({p:.3f})" for name, p in top) for path, top in results)
