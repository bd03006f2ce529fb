"""A user's own model: ``model.name: mypackage.models:build`` names a function, importable where
dsrpipe runs (installed, or on PYTHONPATH), that is called as
``build(num_classes=..., in_channels=..., image_size=..., **model.options)`` and returns an
nn.Module.

Naming it imports and runs that code: only a pipeline or grid the user runs themselves may
(the watch daemon and a grid's `base:` file refuse one, docs/security.md). Validating a pipeline
never imports anything: the name is checked for its form only, the import comes when the model
is built.
"""

from __future__ import annotations

import importlib
import re

from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.models import register_model

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_FORM = re.compile(rf"({_IDENTIFIER}(?:\.{_IDENTIFIER})*):({_IDENTIFIER})")


def names_code(name: str) -> bool:
    """Whether a model name is a `module:function` factory, i.e. building it runs the user's code."""
    return ":" in name


def _parse(name: str) -> dict | None:
    if not names_code(name):
        return None
    if not (match := _FORM.fullmatch(name)):
        raise UserError(f"model '{name}': a factory is named module:function, e.g. mypackage.models:build")
    return {"module": match[1], "function": match[2]}


def _function(module: str, function: str):
    try:
        loaded = importlib.import_module(module)
    except Exception as e:  # the user's module: whatever it raises on import is theirs to fix
        raise UserError(
            f"model '{module}:{function}': cannot import {module} ({type(e).__name__}: {e}); "
            "it must be importable where dsrpipe runs (installed, or on PYTHONPATH)"
        ) from None
    found = getattr(loaded, function, None)
    if not callable(found):
        raise UserError(f"model '{module}:{function}': {module} has no function {function}")
    return found


@register_model("<module>:<function>", parse_name=_parse)
def build_from_factory(
    *, module: str, function: str, num_classes: int, in_channels: int, image_size: int, **options
) -> nn.Module:
    name = f"{module}:{function}"
    try:
        model = _function(module, function)(
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options
        )
    except UserError:
        raise
    except Exception as e:  # their code: one line that says whose it is, not our traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"model factory '{name}' raised {type(e).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory '{name}' returned a {type(model).__name__}, not an nn.Module")
    return model
