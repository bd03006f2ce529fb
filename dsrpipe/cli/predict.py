"""`dsrpipe predict`: the deployer's side, with onnxruntime, numpy and Pillow (and typer) alone."""

from __future__ import annotations

from pathlib import Path

import typer

from ..contract import MAX_IMAGE_SIZE
from ..deploy.predict import format_predictions
from ..deploy.predict import predict as classify
from .common import SUMMARIES, user_errors

app = typer.Typer()


@app.command(help=SUMMARIES["predict"])
@user_errors
def predict(
    model: Path = typer.Argument(..., help="An exported model.onnx.", show_default=False),
    images: list[Path] = typer.Argument(..., help="Image files, or folders of them.", show_default=False),
    top_k: int = typer.Option(1, "--top-k", "-k", help="Classes to list per image."),
    max_side: int = typer.Option(
        None,
        "--max-side",
        show_default=False,
        help=f"Largest image side a model may declare, in pixels: 1 to {MAX_IMAGE_SIZE} "
        "(the default, data.image_size's bound).",
    ),
):
    typer.echo(format_predictions(classify(model, images, top_k, max_side)))
