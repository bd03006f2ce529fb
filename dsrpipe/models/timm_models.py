"""timm's models, named ``timm/<name>`` (``timm/resnet18``, ``timm/vit_tiny_patch16_224``), with the
optional extra ``[timm]``: built untrained (``pretrained=False``: nothing is downloaded), for the
dataset's classes and channels, and at its image size where the model fixes one when built (a
ViT's position embedding: ``img_size``).

Module names stay timm's: pipelines select layers by them. The input layer and the classifier
come from the model's ``pretrained_cfg`` (``first_conv``, ``classifier``), as timm declares them.
"""

from __future__ import annotations

from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.models import DenseDefaults, MissingExtra, register_model

PREFIX = "timm/"
EXTRA = "pip install 'dsrpipe[timm]'"
# timm.create_model's options that load weights: checkpoint_path goes to timm's own torch.load,
# which older timm and torch unpickle with, so a pipeline or a drop naming a pickle there would run
# it. Weights come in only through prune_from and masks_from, read as data (dsrpipe.checkpoint).
WEIGHT_LOADING_OPTIONS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")


def _timm():
    """timm, imported on first use (as long to import as torchvision), or the line naming the extra."""
    try:
        import timm
    except ImportError:
        raise MissingExtra(f"timm models need the optional extra [timm]: {EXTRA}") from None
    return timm


def _parse(name: str) -> dict | None:
    if not name.startswith(PREFIX):
        return None
    model = name[len(PREFIX) :]
    if not _timm().is_model(model):
        raise UserError(f"unknown timm model '{model}' (timm.list_models() lists them)")
    return {"name": model}


def _declared(model: nn.Module, key: str, kind: type) -> str | None:
    """The module that the model's pretrained_cfg names under `key`, if it is a `kind` of the model
    (a distilled model names two classifiers, some name a block: the defaults apply then)."""
    named = (getattr(model, "pretrained_cfg", None) or {}).get(key)
    if not isinstance(named, str):
        return None
    try:
        module = model.get_submodule(named)
    except AttributeError:
        return None
    return named if isinstance(module, kind) else None


@register_model(f"{PREFIX}<name>", parse_name=_parse)
def build_timm_model(
    *, name: str, num_classes: int, in_channels: int, image_size: int, **options
) -> nn.Module:
    timm = _timm()
    if loading := [key for key in WEIGHT_LOADING_OPTIONS if key in options]:
        raise UserError(
            f"model option {', '.join(loading)}: timm models are built untrained here; weights come "
            "only from prune_from or masks_from (read as data, never unpickled)"
        )
    common = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
    try:
        # Models whose forward takes any size reject img_size (ResNet.__init__ ... 'img_size'):
        # those are built without it.
        model = timm.create_model(name, img_size=image_size, **common)
    except TypeError as e:
        if "img_size" not in str(e):
            raise UserError(f"bad options for model '{PREFIX}{name}': {e}") from None
        try:
            model = timm.create_model(name, **common)
        except TypeError as e:
            raise UserError(f"bad options for model '{PREFIX}{name}': {e}") from None
    model.dense_defaults = DenseDefaults(
        first_conv=_declared(model, "first_conv", nn.Conv2d),
        classifier=_declared(model, "classifier", nn.Linear),
    )
    return model
