"""The "thin dense" baseline: a narrower DENSE model with the parameter count of the sparse one.

The budget is what a sparse model keeps at the target sparsity, dense layers included: every
parameter outside the sparse tensors, plus each sparse tensor's active count at uniform sparsity
(the total every distribution keeps). The model's width option is then searched by bisection on the parameter
count (models are built on the meta device, so no memory or initialisation cost). It is a model
change, not a sparsifier: it trains with `Dense`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..models import create_model, models_with_width, width_option
from .budgets import active_budget
from .layers import LayerSelection


def _width_knob(model_name: str, options: dict[str, Any]) -> tuple[str, float]:
    """(option, current value) of a model's real-valued width."""
    knob = width_option(model_name, options)
    if knob is None:
        raise UserError(
            f"thin-dense: model '{model_name}' has no width option to scale "
            f"(supported: {', '.join(models_with_width())})"
        )
    return knob


def thin_model_options(
    model_name: str,
    options: dict[str, Any],
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    sparsity: float,
    layers: LayerSelection | None = None,
) -> tuple[dict[str, Any], int, int]:
    """Model options for a dense model as close as the width allows to the sparse budget.

    Returns (options, achieved parameter count, budget). The width can only shrink; channel
    counts are integers, so a tiny model may miss the budget by a percent or so."""
    knob, full = _width_knob(model_name, options)

    def build(value) -> torch.nn.Module:
        with torch.device("meta"):
            return create_model(
                model_name,
                num_classes=num_classes,
                in_channels=in_channels,
                image_size=image_size,
                **{**options, knob: value},
            )

    def count(value) -> int:
        return sum(p.numel() for p in build(value).parameters())

    model = build(full)
    sparse = (layers or LayerSelection()).select(model)
    total = sum(p.numel() for p in model.parameters())
    kept = sum(active_budget(w.numel(), sparsity) for w in sparse.values()) if sparsity > 0 else 0
    budget = total - sum(w.numel() for w in sparse.values()) + kept if sparsity > 0 else total

    # Bisection for the widest value whose count fits the budget, then the closer of it and the next.
    lo, hi = 0.0, full
    if count(hi) <= budget:
        lo = hi
    else:
        while hi - lo > 1e-6 * full:
            mid = (lo + hi) / 2
            if count(mid) <= budget:
                lo = mid
            else:
                hi = mid
    best = min((v for v in (lo, hi) if v > 0), key=lambda v: (abs(count(v) - budget), v))
    # A readable value: the fewest digits that give the same model.
    best = next(r for r in (round(best, d) for d in range(2, 12)) if r > 0 and count(r) == count(best))
    return {**options, knob: best}, count(best), budget
