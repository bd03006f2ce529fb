"""Which Conv2d and Linear weights of a model are sparse: by rule, or by name."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class LayerSelection:
    """Which Conv2d/Linear weight tensors are sparse.

    By rule: every Conv2d and Linear weight except the first conv (`dense_first`), the classifier
    (`dense_last`) and the modules whose names match an fnmatch pattern of `exclude`. The model
    may declare these (`model.dense_defaults`, set by `dsrpipe.models.create_model`): its first
    conv and classifier by name, and its other dense layers as the default of `exclude` (a WRN's
    shortcut convs, a ResNet's downsample convs); `exclude=None` takes that default, an explicit
    list replaces it. Without declarations: the first Conv2d (an MLP's first Linear is sparse, as
    it holds most of the weights) and the last Linear.

    Or explicitly: `tensors` names the weights to make sparse as `model.named_parameters()` does
    ("layer1.0.conv1.weight", like torch.ao.pruning's `tensor_fqn`); the rule is then unused."""

    dense_first: bool = True
    dense_last: bool = True
    exclude: tuple[str, ...] | None = None
    tensors: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("exclude", "tensors"):  # lists read from YAML become tuples: hashable, immutable
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):
                    raise UserError(f"{name} expects a list of names, got the string '{value}'")
                object.__setattr__(self, name, tuple(value))
        if self.tensors is not None and (
            self.exclude is not None or not self.dense_first or not self.dense_last
        ):
            raise UserError(
                "give either the sparse tensors by name or the rule (dense_first, dense_last, "
                "exclude), not both"
            )

    def select(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The sparse weights, by module name, in model order."""
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if self.tensors is not None:
            by_tensor = {f"{n}.weight": n for n, _ in layers}
            for tensor in self.tensors:
                if tensor not in by_tensor:
                    example = next(iter(by_tensor), "none")
                    raise UserError(
                        f"sparse tensor '{tensor}' is no Conv2d/Linear weight of this model "
                        f"(they are named like '{example}')"
                    )
            chosen = {by_tensor[t] for t in self.tensors}
            return {n: m.weight for n, m in layers if n in chosen}
        declared = getattr(model, "dense_defaults", None)
        convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in layers if isinstance(m, nn.Linear)]
        first = getattr(declared, "first_conv", None) or (convs[0] if convs else None)
        classifier = getattr(declared, "classifier", None) or (linears[-1] if linears else None)
        dense = ({first} if self.dense_first else set()) | ({classifier} if self.dense_last else set())
        patterns = self.exclude if self.exclude is not None else getattr(declared, "dense", ())
        return {
            n: m.weight
            for n, m in layers
            if n not in dense and not any(fnmatch.fnmatchcase(n, p) for p in patterns)
        }


def select_sparse_weights(
    model: nn.Module, layers: LayerSelection | None = None, **rule
) -> dict[str, nn.Parameter]:
    """Conv2d/Linear weights to make sparse, by module name: `layers`, or a LayerSelection made of
    the keywords (`dense_first`, `dense_last`, `exclude`, `tensors`)."""
    if layers is not None and rule:
        raise TypeError("give a LayerSelection or its fields, not both")
    return (layers or LayerSelection(**rule)).select(model)
