"""The `dsrpipe` command: a thin shell over the Python API, its commands in modules by what they
load. A command's module is imported when the command is named (click's lazily loaded
subcommands), so that each command loads what it runs and nothing more: `watch` and `status` (the
daemon) and `predict` (the deployer's side) never import torch, and `dsrpipe --help` imports none
of them.

    stages.py    run and its stages (train-sparse, finetune, export, validate), check, models
    predict.py   predict: onnxruntime, numpy and Pillow
    compare.py   compare
    watch.py     watch and status: torch-free
    common.py    what they share: the one-line ending, the output and executor options
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator, Mapping

import typer
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from .common import SUMMARIES

# Every command, in the order `dsrpipe --help` lists them, and the module of this package that
# defines it (its `app`). The listing shows each one's line from common.SUMMARIES.
COMMANDS = {
    "run": "stages",
    "train-sparse": "stages",
    "finetune": "stages",
    "export": "stages",
    "validate": "stages",
    "predict": "predict",
    "check": "stages",
    "models": "stages",
    "compare": "compare",
    "watch": "watch",
    "status": "watch",
}


@functools.cache
def _commands_of(module: str) -> Mapping[str, TyperCommand]:
    """The commands of one module of this package, imported now."""
    return typer.main.get_group(importlib.import_module(f"{__name__}.{module}").app).commands


class _Commands(Mapping):
    """The root's commands by name: a command's module is imported when the command is looked up."""

    def __getitem__(self, name: str) -> TyperCommand:
        return _commands_of(COMMANDS[name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class _Root(TyperGroup):
    def __init__(self, **attrs):
        super().__init__(**attrs)
        self.commands = _Commands()
        self._listing = False

    def format_help(self, ctx, formatter) -> None:
        self._listing = True  # the listing shows each command's line from SUMMARIES
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)  # typer's lists the commands' items, which imports their modules

    def get_command(self, ctx, cmd_name: str):
        if self._listing and cmd_name in COMMANDS:
            return TyperCommand(cmd_name, help=SUMMARIES[cmd_name])
        return super().get_command(ctx, cmd_name)


app = typer.Typer(
    cls=_Root,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train compact CNNs with Dynamic Sparse Reparameterization; ship sparse ONNX.",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dsrpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
):
    pass
