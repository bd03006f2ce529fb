"""`dsrpipe predict`: the deployer's side, with onnxruntime, numpy and Pillow only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from dsrpipe.cli import app
from dsrpipe.deploy.export import export_onnx

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Oracle(nn.Module):
    """Looks the (normalised) image up among known digits: the class of the nearest one, with a
    wide margin, so predictions are exact and any preprocessing error shows."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.register_buffer("templates", images.flatten(1))
        self.register_buffer("onehot", nn.functional.one_hot(labels, 10).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distances = ((x.flatten(1)[:, None, :] - self.templates[None]) ** 2).sum(-1)
        return nn.functional.softmax(-distances, dim=1) @ self.onehot * 20


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """An exported classifier of 8x8 grey digits whose class names are words, and 6 digits as PNGs
    (0..16 scaled to 0..255, as an image folder would hold them)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pick = np.array([0, 1, 2, 3, 13, 1000])
    pixels = torch.tensor(digits.images[pick] / 16.0, dtype=torch.float32).unsqueeze(1)
    folder = tmp_path_factory.mktemp("predict")
    mean, std = [0.3], [0.4]
    model = Oracle((pixels - mean[0]) / std[0], torch.tensor(digits.target[pick]))
    path = folder / "model.onnx"
    export_onnx(
        model,
        path,
        in_channels=1,
        image_size=8,
        mean=mean,
        std=std,
        metadata={"class_names": json.dumps(NAMES)},
        encoding="dense",
    )
    images = folder / "images"
    images.mkdir()
    for i in pick:
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), "L").save(
            images / f"{i:04d}.png"
        )
    return path, images, [NAMES[t] for t in digits.target[pick]]


def test_predicts_the_right_classes_for_a_folder_and_files(digits_model):
    path, images, expected = digits_model
    result = CliRunner().invoke(app, ["predict", str(path), str(images)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in sorted(images.iterdir())]
    assert [line.split("\t")[1].split(" ")[0] for line in lines] == expected

    one = sorted(images.iterdir())[4]
    result = CliRunner().invoke(app, ["predict", str(path), str(one), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    top = result.output.strip().split("\t")[1].split(", ")
    assert len(top) == 3 and top[0].startswith(expected[4] + " (")
    probabilities = [float(t.split("(")[1].rstrip(")")) for t in top]
    assert probabilities == sorted(probabilities, reverse=True) and probabilities[0] > 0.9


def test_colour_and_larger_images_are_converted_like_the_training_data(digits_model, tmp_path):
    path, images, expected = digits_model
    first = sorted(images.iterdir())[0]
    grey = Image.open(first)
    grey.convert("RGB").resize((32, 32), Image.Resampling.NEAREST).save(tmp_path / "big.jpg", quality=100)
    result = CliRunner().invoke(app, ["predict", str(path), str(tmp_path / "big.jpg")])
    assert result.exit_code == 0 and result.output.split("\t")[1].startswith(expected[0])


@pytest.mark.parametrize(
    "case", ["bad image", "not onnx", "no metadata", "missing image", "a fifo", "empty folder", "bad top-k"]
)
def test_bad_input_is_one_line_and_a_nonzero_exit(digits_model, tmp_path, case):
    path, images, _ = digits_model
    image = str(sorted(images.iterdir())[0])
    if case == "bad image":
        (tmp_path / "x.png").write_bytes(b"not a png")
        args, message = [str(path), str(tmp_path / "x.png")], "cannot read image"
    elif case == "not onnx":
        (tmp_path / "m.onnx").write_bytes(b"not a model")
        args, message = [str(tmp_path / "m.onnx"), image], "not a loadable ONNX model"
    elif case == "no metadata":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        export_onnx(model, tmp_path / "m.onnx", in_channels=1, image_size=8, mean=[0], std=[1], metadata={})
        args, message = [str(tmp_path / "m.onnx"), image], "no class_names in the model's metadata"
    elif case == "missing image":
        args, message = [str(path), str(tmp_path / "nope.png")], "image not found"
    elif case == "a fifo":  # named, not found in a folder: said as what it is, never waited on
        os.mkfifo(tmp_path / "pipe.png")
        args, message = (
            [str(path), str(tmp_path / "pipe.png")],
            f"image {tmp_path / 'pipe.png'} is a FIFO, not a regular file",
        )
    elif case == "empty folder":
        args, message = [str(path), str(tmp_path)], "no images"
    else:
        args, message = [str(path), image, "--top-k", "0"], "--top-k must be at least 1"
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def _run_python(code: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()


def test_predict_never_imports_torch(digits_model):
    """The deployer's side: the command runs with onnxruntime, numpy and Pillow (and the CLI's
    typer) only."""
    path, images, expected = digits_model
    lines = _run_python(
        "import sys\n"
        "from dsrpipe.cli import app\n"
        "try:\n"
        f"    app(['predict', {str(path)!r}, {str(images)!r}])\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    assert lines[-1] == "no torch"
    assert [line.split("\t")[1].split(" ")[0] for line in lines[:-1]] == expected


def test_the_predict_module_needs_no_training_library(digits_model):
    """dsrpipe.deploy.predict imports only dsrpipe.contract and dsrpipe.errors: with torch,
    pydantic, yaml and onnx unimportable, it still classifies (an import of the settings, or of
    any training code, fails here)."""
    path, images, expected = digits_model
    lines = _run_python(
        "import sys\n"
        "for absent in ('torch', 'torchvision', 'pydantic', 'yaml', 'onnx'):\n"
        "    sys.modules[absent] = None  # as if not installed: importing it raises ImportError\n"
        "from dsrpipe.deploy.predict import format_predictions, predict\n"
        f"print(format_predictions(predict({str(path)!r}, [__import__('pathlib').Path({str(images)!r})])))\n"
    )
    assert [line.split("\t")[1].split(" ")[0] for line in lines] == expected


def test_each_images_probabilities_sum_to_one(digits_model):
    """Several images in one batch: each row is a distribution of its own (a softmax over the
    whole batch would give rows that sum to 1/6)."""
    from dsrpipe.deploy.predict import predict

    path, images, expected = digits_model
    results = predict(path, [images], top_k=len(NAMES))
    assert len(results) == len(expected) > 1
    for _, top in results:
        assert len(top) == len(NAMES) and abs(sum(p for _, p in top) - 1) < 1e-9


def _with_input(path: Path, to: Path, dims) -> Path:
    """The model file with other declared input dims [N, C, H, W] (its graph left as it is)."""
    import onnx

    model = onnx.load(path)
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim[1:], dims):
        dim.dim_value = value
    onnx.save(model, to)
    return to


def _with_class_names(path: Path, to: Path, names: str) -> Path:
    import onnx

    model = onnx.load(path)
    for entry in model.metadata_props:
        if entry.key == "class_names":
            entry.value = names
    onnx.save(model, to)
    return to


@pytest.mark.parametrize(
    "case, expected",
    [
        ("side 100000", "declares 100000x100000 images, larger than the 1024 pixels per side"),
        ("side 2**40", "larger than the 1024 pixels per side"),
        ("channels 3", "m.onnx: "),  # onnxruntime fails, or the graph gives the wrong shape
        ("max-side 4", "declares 8x8 images, larger than the 4 pixels per side"),
        ("max-side 200000", "--max-side must be from 1 to 1024 (the largest side a model may declare)"),
        ("max-side 2**40", "--max-side must be from 1 to 1024"),
        ("names nested", "class_names metadata is not a JSON list"),
        ("name with a newline", "class_names must be a list of names"),
        ("a name that is no string", "class_names must be a list of names"),
        (
            "an empty name",
            "class_names must be a list of names (printable text without line breaks, 1 to 256",
        ),
        (
            "a name too long",
            "class_names must be a list of names (printable text without line breaks, 1 to 256",
        ),
        ("nine names for ten", "9 class_names for a model of 10 classes"),
    ],
)
def test_what_a_model_declares_is_bounded_one_line_exit_2(digits_model, tmp_path, case, expected):
    """Before any image is resized: a model declaring huge sides (which made predict allocate
    until the OOM killer came, or overflow), channels its graph does not take, class names
    nested 100k deep or holding a line break."""
    path, images, _ = digits_model
    args = []
    if case.startswith("side"):
        side = 100_000 if case == "side 100000" else 2**40
        path = _with_input(path, tmp_path / "m.onnx", [1, side, side])
    elif case == "channels 3":
        path = _with_input(path, tmp_path / "m.onnx", [3, 8, 8])
    elif case == "max-side 4":
        args = ["--max-side", "4"]
    elif case.startswith("max-side"):  # refused before the model (here one that is not there) is read
        args, path = (
            ["--max-side", str(200_000 if case == "max-side 200000" else 2**40)],
            tmp_path / "none.onnx",
        )
    elif case == "names nested":
        path = _with_class_names(path, tmp_path / "m.onnx", "[" * 100_000 + "]" * 100_000)
    elif case == "name with a newline":
        path = _with_class_names(path, tmp_path / "m.onnx", json.dumps(["zero\nfake\t0.99", *NAMES[1:]]))
    elif case == "a name too long":
        path = _with_class_names(path, tmp_path / "m.onnx", json.dumps(["zero" * 65, *NAMES[1:]]))
    elif case == "an empty name":
        path = _with_class_names(path, tmp_path / "m.onnx", json.dumps(["", *NAMES[1:]]))
    elif case == "nine names for ten":
        path = _with_class_names(path, tmp_path / "m.onnx", json.dumps(NAMES[:9]))
    else:
        path = _with_class_names(path, tmp_path / "m.onnx", json.dumps([["zero"], *NAMES[1:]]))
    result = subprocess.run(
        [sys.executable, "-m", "dsrpipe", "predict", str(path), str(images), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line and "internal error" not in line, line
    assert "fake" not in line and "zerozero" not in line  # nothing of a name is quoted
    assert not result.stdout


@pytest.mark.parametrize("error", [MemoryError, OverflowError])
def test_a_batch_beyond_memory_is_one_line_exit_2(digits_model, monkeypatch, error):
    """Images of the size a model declares that do not fit in memory: one line, exit 2, not
    `internal error: MemoryError`."""

    def short_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image.Image, "convert", short_of_memory)  # as decoding a huge image does
    path, images, _ = digits_model
    result = CliRunner().invoke(app, ["predict", str(path), str(images)])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: {path}: not enough memory for 6 images of 1x8x8 ({error.__name__})"), line
